"""The ConvNeXt V1/V2 model: its config, the module, CPU fusion and class labels."""
