"""Image I/O and geometry: images in physical space, displacement-field files, resampling (SimpleITK)."""
