"""The data: image folders, their splits, decoding and caching, transforms and augmentation, the demo data set."""
