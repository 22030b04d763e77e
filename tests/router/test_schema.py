"""Router request parsing: no workers needed."""

import pytest

from epd.workers.messages import ImagePart, TextPart
from epd.workers.router.errors import APIError
from epd.workers.router.schema import parse_chat_request

URL = "data:image/png;base64,AAAA"


def _body(**extra) -> dict:
    return {"model": "tiny-llava", "messages": [{"role": "user", "content": "hi"}], **extra}


def test_parts_keep_images_in_prompt_order():
    request = parse_chat_request(_body(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": URL}}, {"type": "text", "text": "what?"}]}],
        stop="END", max_completion_tokens=5, stream=True, stream_options={"include_usage": True}))
    parts = request.messages[0].parts
    assert isinstance(parts[0], ImagePart) and isinstance(parts[1], TextPart)
    assert request.image_urls[0][0] == URL
    assert (request.stop, request.max_tokens, request.stream, request.include_usage) == (("END",), 5, True, True)


@pytest.mark.parametrize("extra, param", [
    ({"n": 2}, "n"), ({"max_tokens": 0}, "max_tokens"), ({"temperature": 3}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"seed": -1}, "seed"), ({"stop": [1]}, "stop"), ({"stream": "yes"}, "stream"),
    ({"model": ""}, "model"),
])
def test_invalid_fields_are_400_naming_the_field(extra, param):
    with pytest.raises(APIError) as caught:
        parse_chat_request(_body(**extra))
    assert caught.value.status == 400 and caught.value.param == param
    assert caught.value.body()["error"]["type"] == "invalid_request_error"


def test_body_that_is_not_an_object_is_rejected():
    with pytest.raises(APIError, match="JSON object"):
        parse_chat_request([1, 2])
