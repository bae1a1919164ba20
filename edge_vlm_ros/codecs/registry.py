"""The codec registry: the one place that lists the codecs, and how they are found by name.

Every message names its codec, the edge's configuration names the one it uses, and tools take
codec names on their command lines; all of them look the name up here. Adding a codec is writing
its class (codecs/base.py says what it declares) and adding it to `CODECS`.

Lookups of an unknown name fail with the bad name and the known ones: `ValueError` for
configuration and tools, `unknown_codec` (RequestError, REJECTED) for a message a server received.
`validate_edge_config` holds the checks EdgeConfig runs on its codec fields, `codec_from_config`
builds the edge's codec from them.
"""

from __future__ import annotations

from typing import Any

from ..core.types import Outcome, RequestError, SplitPoint
from .base import Carries, ConfigOption, FeatureCodec
from .image import JpegCodec, RawImageCodec
from .raw import RawCodec
from .vq import VQCodec

CODECS: tuple[type[FeatureCodec], ...] = (RawCodec, JpegCodec, RawImageCodec, VQCodec)
_BY_NAME: dict[str, type[FeatureCodec]] = {c.name: c for c in CODECS}
if len(_BY_NAME) != len(CODECS):
    raise RuntimeError(f"two codecs share a name: {[c.name for c in CODECS]}")
_BY_WIRE_ID: dict[int, type[FeatureCodec]] = {getattr(c, "wire_id", 0): c for c in CODECS}
if len(_BY_WIRE_ID) != len(CODECS) or not all(1 <= i <= 255 for i in _BY_WIRE_ID):
    raise RuntimeError(f"every codec needs its own wire_id in 1..255: "
                       f"{[(c.name, getattr(c, 'wire_id', None)) for c in CODECS]}")


def codec_names() -> list[str]:
    """Every codec name, sorted."""
    return sorted(_BY_NAME)


def image_codec_names() -> list[str]:
    """The codecs that carry the image itself (split point none), in registry order."""
    return [c.name for c in CODECS if c.carries is Carries.IMAGE]


def codec_class(name: str) -> type[FeatureCodec]:
    """The class of codec `name`; ValueError naming the known codecs if there is none."""
    cls = _BY_NAME.get(name)
    if cls is None:
        raise ValueError(f"unknown codec {name!r}; known: {codec_names()}")
    return cls


def codec_wire_ids() -> str:
    """'1 raw, 2 vq, ...': the codec numbers of VisualFeatures.codec, for messages and docs."""
    return ", ".join(f"{i} {c.name}" for i, c in sorted(_BY_WIRE_ID.items()))


def codec_by_wire_id(wire_id: int) -> type[FeatureCodec]:
    """The codec class numbered `wire_id` in VisualFeatures.codec; ValueError ("unknown codec ...")
    naming the number and the known ones otherwise."""
    cls = _BY_WIRE_ID.get(int(wire_id))
    if cls is None:
        raise ValueError(f"unknown codec {int(wire_id)} (known: {codec_wire_ids()})")
    return cls


def make_codec(name: str, **options: Any) -> FeatureCodec:
    """Build a codec by name; options are codec-specific (dtype, quality, codebook, ...) and an
    option the codec does not take is a TypeError."""
    return codec_class(name).build(**options)


def is_image_codec(name: str) -> bool:
    """True for a codec that carries the image (split point none); False for any other name,
    unknown ones included (those are refused when the codec is looked up)."""
    cls = _BY_NAME.get(name)
    return cls is not None and cls.carries is Carries.IMAGE


def uses_codebook(name: str) -> bool:
    """True for a codec whose decoder is a trained codebook, chosen by the message's codebook hash."""
    cls = _BY_NAME.get(name)
    return cls is not None and cls.uses_codebook


def unknown_codec(name: str) -> RequestError:
    """The rejection of a message that names a codec this server does not know."""
    return RequestError(Outcome.REJECTED, f"unknown codec {name!r}; this server knows {codec_names()}")


def config_options() -> list[ConfigOption]:
    """Every EdgeConfig field some codec reads, each once."""
    seen: dict[str, ConfigOption] = {}
    for c in CODECS:
        for o in c.config_options:
            seen.setdefault(o.field, o)
    return list(seen.values())


def validate_edge_config(codec: str, split: SplitPoint, cfg: Any) -> None:
    """The checks of an EdgeConfig's codec settings; ValueError with the bad value.

    The codec must be known and fit the split point (the image codecs go with split point none and
    only there); every codec field must hold a valid value whichever codec is chosen (a typo in a
    field is caught before it is ever used); the chosen codec's required fields must be set.
    """
    cls = codec_class(codec)
    images = " or ".join(image_codec_names())
    if split.kind == "none" and cls.carries is not Carries.IMAGE:
        raise ValueError(f"split_point none sends the image: codec must be {images}, got {codec!r}")
    if not cls.carries.fits(split):
        raise ValueError(f"codec {codec!r} only goes with split_point none, got {str(split)!r}")
    for o in cls.config_options:
        if o.required and not getattr(cfg, o.field):
            raise ValueError(f"codec {codec} needs {o.field}")
    for o in config_options():
        problem = o.problem(getattr(cfg, o.field))
        if problem:
            raise ValueError(problem)


def codec_from_config(cfg: Any, adapter: Any = None, split: SplitPoint | None = None) -> FeatureCodec:
    """The edge's codec as EdgeConfig `cfg` describes it (`adapter`, `split`: the edge's model and
    split point, which a codebook must belong to)."""
    cls = codec_class(cfg.codec)
    return cls.build(**cls.options_from_config(cfg, adapter=adapter, split=split))
