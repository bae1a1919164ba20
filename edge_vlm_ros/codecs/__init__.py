"""Feature codecs: how the robot's features (or, for the cloud-only baseline, its image) cross the wire.

- base.py: the FeatureCodec interface (name, what it carries, config options, encode / check_header /
  decode), DecodeLimits and the checks every codec shares; it knows no codec.
- raw.py ("raw"), image.py ("jpeg", "image"), vq.py ("vq"): the codecs, one module per family.
- token_stats.py: the per-token LayerNorm statistics that splits inside a block add as side info.
- codebook.py: VQ codebooks as hashed, validated files.
- registry.py: the one list of codecs; look codecs up there (make_codec, codec_names, ...).

Import from the module that defines a name; this file imports nothing, so importing one codec module
loads only what that module needs.
"""
