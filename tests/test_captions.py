import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from flam_core.config import CaptionParams, LlmCaptionParams
from flam_core.data.captions import caption_table, template_captions
from flam_core.errors import ExternalToolError


def test_captions_start_with_the_label_and_are_distinct_and_seeded():
    captions = template_captions("dog barking", "event", ("a small dog yapping",), per_label=6, seed=1)
    assert captions[0] == "dog barking" and captions[1] == "a small dog yapping"
    assert len(captions) == len(set(captions)) == 6
    assert captions == template_captions("dog barking", "event", ("a small dog yapping",), 6, 1)
    assert captions != template_captions("dog barking", "event", ("a small dog yapping",), 6, 2)
    # synonyms make variants that keep the meaning
    many = template_captions("dog barking", "event", (), per_label=40, seed=1)
    assert {"puppy barking", "dog yapping"} <= set(many)


def test_background_captions_use_background_phrasing():
    captions = template_captions("room tone", "background", (), per_label=6, seed=0)
    assert all("room tone" in c for c in captions)
    assert not any("in the distance" in c for c in captions)


class _FakeChat(BaseHTTPRequestHandler):
    """An OpenAI-compatible /chat/completions endpoint on loopback that counts its calls."""

    calls: list[dict] = []  # noqa: RUF012
    reply: object = None

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls.append(body)
        payload = json.dumps({"choices": [{"message": {"content": json.dumps(type(self).reply)}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def chat_server():
    _FakeChat.calls = []
    server = HTTPServer(("127.0.0.1", 0), _FakeChat)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1", _FakeChat
    server.shutdown()


def test_llm_rewrite_is_used_and_cached(tmp_path, chat_server):
    endpoint, handler = chat_server
    handler.reply = ["A Dog Barks Loudly Outside", "barking from a puppy", "x"]
    params = CaptionParams(per_label=4, llm=LlmCaptionParams(enabled=True, endpoint=endpoint))
    table = caption_table({"dog barking": ("event", ())}, params, cache_root=tmp_path)
    # the label stays first; one-word answers are dropped; text is lower-cased
    assert table["dog barking"] == ["dog barking", "a dog barks loudly outside", "barking from a puppy"]
    assert len(handler.calls) == 1 and "dog barking" in handler.calls[0]["messages"][0]["content"]
    again = caption_table({"dog barking": ("event", ())}, params, cache_root=tmp_path)
    assert again == table and len(handler.calls) == 1  # answered from the cache file
    assert (tmp_path / params.llm.cache_path).is_file()


def test_llm_unusable_answer_is_a_clear_error(tmp_path, chat_server):
    endpoint, handler = chat_server
    handler.reply = {"not": "a list"}
    params = CaptionParams(llm=LlmCaptionParams(enabled=True, endpoint=endpoint))
    with pytest.raises(ExternalToolError, match="caption endpoint"):
        caption_table({"dog barking": ("event", ())}, params, cache_root=tmp_path)


def test_llm_unreachable_endpoint_is_a_clear_error(tmp_path):
    params = CaptionParams(llm=LlmCaptionParams(enabled=True, endpoint="http://127.0.0.1:9/v1", timeout_s=2))
    with pytest.raises(ExternalToolError, match=r"caption endpoint http://127\.0\.0\.1:9/v1"):
        caption_table({"dog barking": ("event", ())}, params, cache_root=tmp_path)
