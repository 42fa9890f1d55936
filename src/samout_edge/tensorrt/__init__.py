"""TensorRT: one versions table, the ONNX lint, build plans, the Polygraphy build and the CumMax plugin."""
