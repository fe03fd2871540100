"""Data: the datalist schema, ROI files, synthetic data, transforms, inference inputs and preparation."""
