"""Images of chat requests: OpenAI `image_url` parts -> the Engine's multimodal prompt.

    prompt = image_prompt(engine, rendered_text, parts, request_id)     # a MultimodalPrompt for add_request

Only data URLs (`data:image/png;base64,...`) are accepted. The server never fetches a URL: an http(s) URL would let
any client make the server connect to any host, and a slow host would hold the request. Local paths and file://
URLs are refused too (they would read the server's files). Each part is decoded and its size checked on its own, so
that a bad image gets a 400 naming its field (`messages[1].content[0].image_url`). The rendered prompt, whose
`]<]image[>[` markers stand where the parts were, then goes through `Engine.multimodal_prompt` as a
`{"text", "images"}` prompt: the same processing, placeholder expansion and checks as `m3jax.generate` with that
prompt, and `Engine.add_request` keys the prefix cache by the images' content (MultimodalPrompt.cache_salt).
"""

from __future__ import annotations

from typing import Sequence

from m3jax.chat import ImagePart
from m3jax.serve.protocol import bad
from m3jax.vision.processor import ImageInputError
from m3jax.vision.prompt import MultimodalPrompt, decode_data_url


def _refuse_unless_served(engine, parts: Sequence[ImagePart]) -> None:
    from m3jax.distributed import LeaderEngine

    if getattr(engine, "vision", None) is None:
        raise bad(parts[0].field, "this model has no vision tower; it takes text only", "images_not_supported")
    if isinstance(engine, LeaderEngine):
        # its followers replay requests as token ids; image features would not reach them
        raise bad(parts[0].field, "a multi-process server takes text prompts only", "images_not_supported")


def load_image(part: ImagePart, processor):
    """The PIL image of one part; a bad URL or image raises APIError 400 naming part.field."""
    import PIL.Image

    url = part.url
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("http", "https"):
        raise bad(part.field, f"this server does not fetch URLs ({url[:60]!r}); send the image inline as a data URL "
                              f"(data:image/png;base64,...)", "unsupported_image_url")
    if scheme != "data":
        raise bad(part.field, f"must be a data URL (data:image/png;base64,...), got {url[:60]!r}",
                  "unsupported_image_url")
    try:
        image = decode_data_url(url, part.field)
        processor.num_patches(image.height, image.width)      # zero-sized or extreme aspect ratios raise here
    except ImageInputError as e:
        message = str(e)
        raise bad(part.field, message[len(part.field) + 2:] if message.startswith(part.field) else message,
                  "invalid_image") from None
    except PIL.Image.DecompressionBombError as e:
        raise bad(part.field, f"the image is too large: {e}", "invalid_image") from None
    return image


def image_prompt(engine, text: str, parts: Sequence[ImagePart], request_id: str) -> MultimodalPrompt:
    """The MultimodalPrompt of a rendered chat prompt whose markers stand for `parts`, in order. CPU work
    (decoding, resizing, patching): call it off the event loop. Raises APIError (400) naming the field."""
    _refuse_unless_served(engine, parts)
    images = [load_image(p, engine.image_processor) for p in parts]
    try:
        return engine.multimodal_prompt({"text": text, "images": images}, request_id)
    except ValueError as e:                      # markers typed into the text, placeholders that do not fit...
        raise bad("messages", str(e)) from None


__all__ = ["image_prompt", "load_image"]
