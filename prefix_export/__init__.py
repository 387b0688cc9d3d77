"""prefix-export: a Hugging Face LM + a PEFT prefix-tuning checkpoint -> a validated ONNX decoder.

The pipeline, one subpackage per stage:
  source/ (model, checkpoint, registry, prefix KV) -> export/ (kinds, wrappers, exporter, graph, output)
  -> validate/ (against PEFT) -> runtime/ (sessions, loop, generation) -> compile/, deploy/, bench/.
`folder.py` owns the export folder's on-disk format; `api.py` runs the pipeline; `cli.py` is thin.
"""
__version__ = "0.1.0"
