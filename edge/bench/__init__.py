"""What measures the device side: batch-1 latency, int8 accuracy and near-duplicate search from device queries."""
