"""What a released Concord model is, without torch: manifest, spaces and lineage, preprocessing, ONNX runtime."""
