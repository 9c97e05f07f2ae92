"""Generated graphs through every pass (issue 15): hypothesis strategies that build valid ONNX models
(``strategies``, with ``builder`` and ``families``) and the property test that runs them through the pipeline."""
