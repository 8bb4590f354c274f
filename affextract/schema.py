"""Names and orders shared by the model, the HDF5 format and seqhead (see docs/format.md)."""

from pathlib import Path

import numpy as np

FORMAT = "affextract-features"
FORMAT_VERSION = 1

# Aff-Wild2 / ABAW order.
EXPRESSIONS = ("neutral", "anger", "disgust", "fear", "happiness", "sadness", "surprise")
# Union of the AUs annotated in Aff-Wild2 and EmotioNet, plus AU11 (paper Table 1).
AUS = (1, 2, 4, 5, 6, 7, 9, 10, 11, 12, 15, 17, 20, 23, 24, 25, 26)
AU_NAMES = tuple(f"AU{a}" for a in AUS)
FEATURE_NAMES = ("valence", "arousal") + EXPRESSIONS + AU_NAMES  # 26 values per frame

VA = slice(0, 2)
EXPR = slice(2, 9)
AU = slice(9, 26)
GROUPS = {"va": VA, "expr": EXPR, "au": AU}

# Expression -> AU prior of the paper's Table 1 (Du et al. 2014): prototypical and observational AUs.
_PRIOR_AUS = {
    "happiness": (6, 12, 25),
    "sadness": (1, 4, 6, 11, 15, 17),
    "fear": (1, 2, 4, 5, 20, 25, 26),
    "anger": (4, 7, 10, 17, 23, 24),
    "surprise": (1, 2, 5, 25, 26),
    "disgust": (4, 9, 10, 17, 24),
}
# (7, 17): r_{AU|expr}; the neutral row is all zero.
AU_PRIOR = np.array(
    [[1.0 if au in _PRIOR_AUS.get(e, ()) else 0.0 for au in AUS] for e in EXPRESSIONS], dtype=np.float32
)

# -- measured movement (affextract.movement: MediaPipe face mesh and blendshapes), stored beside `features` ---------
# The 52 outputs of the blendshapes model, in its order (MediaPipe face_landmarker_graph.cc). All 52 are kept so that
# indices match MediaPipe's; ``_neutral`` (index 0) carries no movement and is to be ignored by readers. Left/Right
# are the subject's (ARKit convention): mouthSmileLeft is the corner on the image's right in an unmirrored video.
BLENDSHAPE_NAMES = (
    "_neutral", "browDownLeft", "browDownRight", "browInnerUp", "browOuterUpLeft", "browOuterUpRight", "cheekPuff",
    "cheekSquintLeft", "cheekSquintRight", "eyeBlinkLeft", "eyeBlinkRight", "eyeLookDownLeft", "eyeLookDownRight",
    "eyeLookInLeft", "eyeLookInRight", "eyeLookOutLeft", "eyeLookOutRight", "eyeLookUpLeft", "eyeLookUpRight",
    "eyeSquintLeft", "eyeSquintRight", "eyeWideLeft", "eyeWideRight", "jawForward", "jawLeft", "jawOpen", "jawRight",
    "mouthClose", "mouthDimpleLeft", "mouthDimpleRight", "mouthFrownLeft", "mouthFrownRight", "mouthFunnel",
    "mouthLeft", "mouthLowerDownLeft", "mouthLowerDownRight", "mouthPressLeft", "mouthPressRight", "mouthPucker",
    "mouthRight", "mouthRollLower", "mouthRollUpper", "mouthShrugLower", "mouthShrugUpper", "mouthSmileLeft",
    "mouthSmileRight", "mouthStretchLeft", "mouthStretchRight", "mouthUpperUpLeft", "mouthUpperUpRight",
    "noseSneerLeft", "noseSneerRight",
)
# Head pose in degrees, from the mesh against MediaPipe's canonical face. yaw > 0: the subject turns to their left
# (the nose moves to the image's right in an unmirrored video); pitch > 0: chin up (the nose points above the camera);
# roll > 0: the face turns counter-clockwise on screen (the head tilts towards the subject's right shoulder). A
# frontal upright face is (0, 0, 0).
POSE_NAMES = ("yaw", "pitch", "roll")
# Gaze direction of both eyes together, in degrees, relative to the camera (head pose included): yaw > 0 towards the
# subject's left (the image's right), pitch > 0 upwards. Looking straight into the camera is (0, 0).
GAZE_NAMES = ("gaze_yaw", "gaze_pitch")

MESH_POINTS = 478  # points of MediaPipe's face mesh: 468 face points + 2 x 5 iris points

# seqhead feature groups read from the movement datasets: group -> (dataset, its columns kept). `_neutral` (column 0
# of blendshapes) carries no movement and is left out.
MOVEMENT_GROUPS = {"bs": ("blendshapes", slice(1, len(BLENDSHAPE_NAMES))), "pose": ("pose", slice(0, 3)),
                   "gaze": ("gaze", slice(0, 2))}


# -- files shipped in the package --------------------------------------------------------------------------------
WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "mma_ferplus_small.safetensors"  # the MMA every command uses without --weights
