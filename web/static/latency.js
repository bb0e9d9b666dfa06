// The latency panel: one waterfall row per turn (the server's ledger, stage by
// stage against the budget line), the browser's mouth-to-ear tick on the same
// scale, and p50/p95 over the call.  Under each bar, each engine's work on the
// turn's critical path and how long its request queued first (the ledger's
// work_ms / queue_ms: shared engines serve many calls, so a slow stage says
// whether it waited or computed).  A remote engine (a model node, issue 13)
// adds its time on the network (the ledger's network_ms), apart from the model
// node's own queue and work.  Beside the browser's own mouth-to-ear, the
// server's estimate of it (the ledger's mouth_to_ear_estimate_ms: inbound
// transport + voice-to-voice + outbound transport, from "turn_heard").
export const STAGES = [
  ["endpointing", "endpointing"],
  ["stt", "speech-to-text"],
  ["llm_tool_call", "LLM tool call"],   // tool turns only: the model's answer up to its tool call
  ["tool", "tools"],                    // the tools and the model's rounds between them
  ["llm_first_token", "LLM first token"],
  ["first_piece", "first piece"],
  ["tts_first_audio", "TTS first audio"],
  ["send", "send"],
];

/** Linear-interpolated percentile (numpy's default), or null for no data. */
export function percentile(values, q) {
  if (!values.length) return null;
  const s = [...values].sort((a, b) => a - b);
  const pos = (s.length - 1) * q / 100;
  const lo = Math.floor(pos), hi = Math.ceil(pos);
  return s[lo] + (s[hi] - s[lo]) * (pos - lo);
}

//: the engines whose queue wait the ledger keeps, and the stage each one ends
export const ENGINES = [["stt", "stt"], ["llm", "llm_first_token"], ["tts", "tts_first_audio"]];

const ms = (v) => (v == null ? "–" : `${Math.round(v)} ms`);

/** "stt 90 ms (queued 0) · llm 180 ms (queued 40, network 3)": each engine's work, queue wait and, for a
 * remote engine, its network time; "" without them. */
export function engineLine(ledger) {
  const queue = (ledger && ledger.queue_ms) || {}, work = (ledger && ledger.work_ms) || {};
  const network = (ledger && ledger.network_ms) || {};
  return ENGINES.filter(([e]) => queue[e] != null || work[e] != null || network[e] != null)
    .map(([e]) => `${e} ${ms(work[e])} (queued ${queue[e] == null ? "–" : Math.round(queue[e])}` +
      `${network[e] == null ? "" : `, network ${Math.round(network[e])}`})`).join(" · ");
}

export class Latency {
  constructor({ waterfall, legend, cards }, budgetMs = 300) {
    this.el = waterfall;
    this.cards = cards;
    this.budget = budgetMs;
    this.rows = new Map();   // turn → {ledger, m2e}
    legend.innerHTML = STAGES.map(([k, label]) => `<span><i style="background:var(--${k})"></i>${label}</span>`).join("");
    this.render();
  }

  setBudget(budgetMs) { this.budget = budgetMs; this.render(); }
  reset() { this.rows.clear(); this.render(); }

  row(turn) {
    if (!this.rows.has(turn)) this.rows.set(turn, { ledger: null, m2e: null });
    return this.rows.get(turn);
  }
  addLedger(turn, ledger) { this.row(turn).ledger = ledger; this.render(); }
  addMouthToEar(turn, m2e) { this.row(turn).m2e = m2e; this.render(); }

  values() {
    const rows = [...this.rows.values()];
    return {
      v2v: rows.map((r) => r.ledger && r.ledger.voice_to_voice_ms).filter((v) => v != null),
      m2e: rows.map((r) => r.m2e).filter((v) => v != null),
      est: rows.map((r) => r.ledger && r.ledger.mouth_to_ear_estimate_ms).filter((v) => v != null),
    };
  }

  render() {
    const { v2v, m2e, est } = this.values();
    const top = Math.max(this.budget * 2, ...v2v, ...m2e);
    const step = top <= 1000 ? 100 : top <= 3000 ? 500 : 1000;
    const scale = Math.ceil(top / step) * step;
    const pct = (v) => `${Math.min(100, (100 * v) / scale).toFixed(2)}%`;
    const parts = [];
    for (const [turn, r] of [...this.rows.entries()].sort((a, b) => a[0] - b[0])) {
      let cursor = 0, segs = "";
      const queue = (r.ledger && r.ledger.queue_ms) || {};
      const network = (r.ledger && r.ledger.network_ms) || {};
      if (r.ledger) {
        for (const [k, label] of STAGES) {
          const d = r.ledger.stages_ms[k];
          if (d == null) continue;
          const engine = ENGINES.find(([, stage]) => stage === k);
          const queued = (engine && queue[engine[0]] != null ? ` (queued ${Math.round(queue[engine[0]])} ms)` : "") +
            (engine && network[engine[0]] != null ? ` (network ${Math.round(network[engine[0]])} ms)` : "");
          segs += `<div class="seg" title="${label}: ${Math.round(d)} ms${queued}" style="left:${pct(cursor)};width:${pct(d)};background:var(--${k})"></div>`;
          cursor += d;
        }
      }
      const tick = r.m2e == null ? "" : `<div class="m2e" title="mouth-to-ear ${Math.round(r.m2e)} ms" style="left:${pct(r.m2e)}"></div>`;
      const v = r.ledger ? r.ledger.voice_to_voice_ms : null;
      const e = r.ledger ? r.ledger.mouth_to_ear_estimate_ms : null;
      parts.push(`<div class="row" data-turn="${turn}"><span class="name">turn ${turn}</span>
        <div class="track">${segs}<div class="budget" style="left:${pct(this.budget)}"></div>${tick}</div>
        <span class="nums"><span class="v2v">${ms(v)}</span> · <span class="m2e-val" title="mouth-to-ear measured by this browser">ear ${ms(r.m2e)}</span> · <span class="m2e-est" title="the server's estimate of mouth-to-ear (its ledger)">est ${ms(e)}</span></span>
        <span class="queues" title="each engine's work on this turn, how long its request queued first and, for a remote engine, its time on the network (ms)">${engineLine(r.ledger)}</span></div>`);
    }
    if (parts.length) {
      const every = scale / step <= 10 ? step : step * 2;
      const ticks = Array.from({ length: Math.floor(scale / every) + 1 }, (_, i) => `<span style="left:${pct(i * every)}">${i * every}</span>`).join("");
      parts.push(`<div class="axis"><span></span><div class="scale">${ticks}</div><span>ms after end of speech</span></div>`);
    } else {
      parts.push(`<p class="hint">No turns yet.</p>`);
    }
    this.el.innerHTML = parts.join("");
    this.renderCards(v2v, m2e, est);
  }

  renderCards(v2v, m2e, est = []) {
    const c = this.cards;
    const last = (a) => (a.length ? a[a.length - 1] : null);
    const lastV = last(v2v);
    c.v2vLast.textContent = ms(lastV);
    c.v2vLast.className = "v" + (lastV == null ? "" : lastV <= this.budget ? " under" : " over");
    c.v2vPct.textContent = `p50 ${ms(percentile(v2v, 50))} · p95 ${ms(percentile(v2v, 95))}`;
    const lastM = last(m2e);
    c.m2eLast.textContent = ms(lastM);
    c.m2ePct.textContent = `p50 ${ms(percentile(m2e, 50))} · p95 ${ms(percentile(m2e, 95))}` +
      ` · server's estimate p50 ${ms(percentile(est, 50))}`;
    const within = v2v.filter((v) => v <= this.budget).length;
    c.goodput.textContent = v2v.length ? `${Math.round((100 * within) / v2v.length)}%` : "–";
    c.turnCount.textContent = `${within} of ${v2v.length} turns`;
  }
}
