"""The model: pretrained backbones, their blocks, new heads, freezing, the LightningModule and its metrics."""
