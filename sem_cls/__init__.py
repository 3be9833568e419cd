"""sem-cls: train, evaluate and apply classifiers for scanning-electron-microscope images."""
