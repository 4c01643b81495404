"""One module per Hugging Face architecture; `models.hf.registry` finds them all, so adding
a family is adding a file here with: MODEL_TYPE, ARCHITECTURE, PRIORITY (lower is tried first
when exporting a model that came from no checkpoint), `decoder_fields(hf)`, `tensors(cfg)`,
`writable(cfg)` (None, or why this family cannot express `cfg`) and `config_json(cfg, base,
dtype)`."""
