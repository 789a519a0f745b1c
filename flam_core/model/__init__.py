"""Neural network models: pretrained audio backbones (YAMNet) and the FLAM model."""
