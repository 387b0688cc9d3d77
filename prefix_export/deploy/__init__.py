"""Deploy targets written into an export folder: onnxruntime-genai and Triton."""
