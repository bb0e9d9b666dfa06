"""A second real phone: baresip calls, plays a spoken question, and records what it hears.

baresip (`aufile` as its microphone, `sndfile` recording the decoded far
end) hangs up when its source file ends; transcribing its recording must
give the words of the agent's reply.
"""
from __future__ import annotations

import difflib
import shutil

import numpy as np
import pytest

from sub300.agent.audio import int16_to_float32, resample
from sub300.media.audio_file import read_audio

from .speech import compose, save, speak, voiced_span
from .test_sip_support import Peer, sip_service, words

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("baresip") is None, reason="baresip missing")]

CONFIG = """poll_method epoll
sip_listen 127.0.0.1:0
net_interface 127.0.0.1
audio_source aufile,{source}
audio_player aufile,{rec}/unused.wav
audio_alert aufile,/dev/null
audio_srate 8000
audio_channels 1
module_path /usr/lib/baresip/modules
module g711.so
module aufile.so
module sndfile.so
snd_path {rec}
module_app account.so
module_app menu.so
"""


async def test_baresip_hears_the_agents_reply(config, engines, tmp_path):
    question = compose(1.0, speak("What is the capital of France?"), 8.0)   # stays on the line 8 s for the answer
    source = save(tmp_path / "question8k.wav", resample(question, 16000, 8000), 8000)
    rec = tmp_path / "rec"
    rec.mkdir()
    (tmp_path / "config").write_text(CONFIG.format(source=source, rec=rec))
    (tmp_path / "accounts").write_text("<sip:caller@127.0.0.1;transport=udp>;regint=0;audio_codecs=PCMU\n")
    async with sip_service(config, engines) as (service, observer):
        phone = Peer(["baresip", "-f", str(tmp_path), "-e", f"/dial sip:agent@127.0.0.1:{service.address[1]}",
                      "-t", "20"], log_path=str(tmp_path / "baresip.log"))
        try:
            await phone.wait(30)
        finally:
            phone.stop()
        (call,) = await observer.wait_ended()
    assert call.ended == "caller hung up"
    assert call.turns, call.kinds()
    reply = call.turns[0].reply
    (heard_file,) = rec.glob("*-dec.wav")
    heard = read_audio(heard_file)   # 16 kHz
    span = voiced_span(heard)
    assert span is not None, "baresip heard silence"
    text = engines.stt.transcribe(int16_to_float32(heard[int(span[0] * 16000):])).text
    # tiny.en on 8 kHz G.711 misspells names ("France is Paris" → "Francis Perris"):
    # a reply word counts as heard when a transcribed word is spelled nearly the same
    recognised = {w for w in words(reply)
                  if any(difflib.SequenceMatcher(None, w, t).ratio() >= 0.7 for t in words(text))}
    assert len(recognised) >= max(2, len(words(reply)) // 2), (reply, text)
    assert np.abs(heard).max() > 1000
