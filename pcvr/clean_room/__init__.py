"""The clean room: joins platform features with noisy labels and computes batch adapter gradients."""
