"""Released safetensors (BF16 or MXFP8, sharded) -> m3jax parameters and Orbax checkpoints.

safetensors_io  headers (validated against file sizes), positional region reads, atomic writers
mxfp8           E4M3 x E8M0 dequantisation (bit-exact, 255 = NaN) and quantisation
weight_map      released name -> parameter path / layout, as data
source          ReleaseCheckpoint: whole-checkpoint validation, read_box(param, box) of any device slice
placement       shardings (pluggable, default: experts over the mesh), pieces, on-device assembly
loader          load_release: stream a release dir onto devices (jax.make_array_from_callback)
orbax_io        convert (release -> Orbax pieces, host only, bounded memory) and restore onto any mesh
cli             `m3jax convert SRC DST [--dtype] [--overwrite]` (add_arguments / convert_main)
synthetic       release-format checkpoints of any config (benchmark data, sparse full-size headers)
"""
