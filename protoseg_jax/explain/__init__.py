"""Explanations that know no method: free-text similarity maps, prototype maps, top-k patches, a static page.

Everything takes arrays (features, CAMs, masks, tiles) that the model side computes:
  query          phrases -> cosine maps over tiles, statistics, heatmap overlays, terminology sheets
  prototype_map  per-pixel winning prototype of the pixel's class, palette PNG and legend
  topk           streamed top-k patches per prototype (device state), win counts
  page           crops and the self-contained HTML page with `prototypes.json`
  colors         the heatmap colormap and the prototype palette (OKLab, built here)
"""
