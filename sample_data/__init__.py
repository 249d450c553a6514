"""The sample pairs, installed with the package as ``napari_regtool.samples`` (see README.md in this folder)."""
