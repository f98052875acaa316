"""MPAMatch: semi-supervised segmentation with image- and text-prototype pixel contrast (UniMatch loop)."""
