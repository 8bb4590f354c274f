"""Faces in a frame: `detectors` (the detector interface and registry: MTCNN by default, SCRFD, BlazeFace), `mtcnn`
(the shipped MTCNN in torch), `tracking` (key-frame detection and tracks between key frames) and `align` (every
model's crop: the MMA's ArcFace face, MediaPipe's mesh crop).

Import from the modules (`from affextract.faces.detectors import make_detector`); this package re-exports nothing.
"""
