// Runs on the audio thread, on the AudioContext's clock (currentTime).
// Input 0: the local microphone.  Input 1: the agent's incoming track.
// Posts the mic level ~20×/s, and an "onset" when the agent's audio starts
// after silence, together with when the caller's speech last ended: their
// difference is mouth-to-ear, both ends measured on the same clock.
const MIC_VOICED_DB = -48;      // the fake mic and a quiet room both sit well below this
const REMOTE_ONSET_DB = -55;    // the server sends digital silence between replies
const REMOTE_GAP_S = 0.25;      // agent silence needed before a new onset counts
const LEVEL_EVERY_S = 0.05;

function dbfs(channel) {
  if (!channel || channel.length === 0) return -Infinity;
  let sum = 0;
  for (let i = 0; i < channel.length; i++) sum += channel[i] * channel[i];
  const rms = Math.sqrt(sum / channel.length);
  return rms > 0 ? 20 * Math.log10(rms) : -Infinity;
}

class Sub300Meter extends AudioWorkletProcessor {
  constructor() {
    super();
    this.micPeak = -Infinity;
    this.remotePeak = -Infinity;
    this.nextLevel = 0;
    this.lastMicVoicedEnd = null;   // end time of the last voiced mic block
    this.lastRemoteLoudEnd = -1e9;
    this.lastOnset = -1e9;
  }

  process(inputs) {
    const block = 128 / sampleRate;
    const mic = dbfs(inputs[0] && inputs[0][0]);
    const remote = dbfs(inputs[1] && inputs[1][0]);
    const t = currentTime;
    this.micPeak = Math.max(this.micPeak, mic);
    this.remotePeak = Math.max(this.remotePeak, remote);
    if (mic > MIC_VOICED_DB) this.lastMicVoicedEnd = t + block;
    if (remote > REMOTE_ONSET_DB) {
      const afterGap = t - this.lastRemoteLoudEnd >= REMOTE_GAP_S;
      // One onset per caller utterance: the caller must have spoken since the previous one.
      const spokeSince = this.lastMicVoicedEnd !== null && this.lastMicVoicedEnd > this.lastOnset;
      if (afterGap && spokeSince) {
        this.lastOnset = t;
        this.port.postMessage({ type: "onset", at: t, speechEnd: this.lastMicVoicedEnd });
      }
      this.lastRemoteLoudEnd = t + block;
    }
    if (t >= this.nextLevel) {
      this.port.postMessage({ type: "level", at: t, mic: this.micPeak, remote: this.remotePeak });
      this.micPeak = this.remotePeak = -Infinity;
      this.nextLevel = t + LEVEL_EVERY_S;
    }
    return true;
  }
}

registerProcessor("sub300-meter", Sub300Meter);
