"""Convert MediaPipe's face models (.tflite, Apache-2.0) into the safetensors files that affextract.movement loads.

    python tools/convert_mediapipe.py SOURCE [--out affextract/weights] [--check]

SOURCE is a folder holding face_landmarks_detector.tflite, face_blendshapes.tflite and
geometry_pipeline_metadata_landmarks.binarypb (e.g. ../shared/models/mediapipe), or the .task bundle they come from
(face_landmarker_v2_with_blendshapes.task, a zip).

Writes, each with a .json beside it (source file, its SHA-256, licence, names, and the SHA-256 of the .safetensors
that the loader checks):
- mediapipe_face_mesh_v2.safetensors   Face Mesh v2 weights, fp32 as in the .tflite
- mediapipe_blendshapes.safetensors    blendshapes weights, fp16 as in the .tflite (its weights are fp16 there)
- mediapipe_face_geometry.safetensors  the 468 canonical vertices (cm) and MediaPipe's Procrustes landmark weights,
                                       both from the geometry metadata (its canonical mesh is in landmark order;
                                       it is the mesh canonical_face_model.obj holds upstream, where the vertices
                                       follow the landmark order too)

Reading needs the ``tflite`` flatbuffer package (development only). TFLite tensors are NHWC; convolution weights
are OHWI (depthwise 1HWO), so they become OIHW (depthwise C1HW) here. Every operator's padding, stride and
activation is checked against the torch module's, so a differently built .tflite is refused rather than mis-read.
With --check (needs ai-edge-litert) the converted models are compared with LiteRT on random inputs.
"""

from __future__ import annotations

import argparse
import hashlib
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from affextract.movement import (  # noqa: E402
    BLENDSHAPE_LANDMARKS, BLENDSHAPE_NAMES, MEDIAPIPE_FORMAT, N_FACE, N_LANDMARKS, Blendshapes, FaceMesh,
)
from affextract.weights import write_weights  # noqa: E402

MESH_FILE = "face_landmarks_detector.tflite"
BLENDSHAPE_FILE = "face_blendshapes.tflite"
GEOMETRY_FILE = "geometry_pipeline_metadata_landmarks.binarypb"
ORIGIN = "google-ai-edge/mediapipe, mediapipe/tasks/testdata/vision/face_landmarker_v2_with_blendshapes.task"


class Graph:
    """The operators of a .tflite subgraph with their constant inputs read out (fp16 DEQUANTIZE resolved to fp32)."""

    def __init__(self, data: bytes) -> None:
        import tflite

        self.tflite = tflite
        self.model = tflite.Model.GetRootAsModel(data, 0)
        self.graph = self.model.Subgraphs(0)
        names = {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}
        self.ops = []
        dequantized = {}
        for i in range(self.graph.OperatorsLength()):
            op = self.graph.Operators(i)
            code = self.model.OperatorCodes(op.OpcodeIndex())
            name = names[max(code.BuiltinCode(), code.DeprecatedBuiltinCode())]
            inputs = [op.Inputs(j) for j in range(op.InputsLength())]
            if name == "DEQUANTIZE":
                dequantized[op.Outputs(0)] = self.buffer(inputs[0]).astype(np.float32)
                continue
            consts = [dequantized.get(t) if t in dequantized else self.buffer(t) for t in inputs]
            self.ops.append((name, consts, op))

    def buffer(self, tensor: int) -> np.ndarray | None:
        if tensor < 0:
            return None
        t = self.graph.Tensors(tensor)
        raw = self.model.Buffers(t.Buffer()).DataAsNumpy()
        if isinstance(raw, int) or raw.size == 0:
            return None
        dtype = {0: np.float32, 1: np.float16, 2: np.int32, 4: np.int64}[t.Type()]
        shape = t.ShapeAsNumpy() if t.ShapeLength() else ()
        return np.frombuffer(raw.tobytes(), dtype).reshape(shape)

    def options(self, op, cls):
        raw = op.BuiltinOptions()
        opts = cls()
        opts.Init(raw.Bytes, raw.Pos)
        return opts

    def of(self, *names: str) -> list:
        return [o for o in self.ops if o[0] in names]


def _conv(g: Graph, op, layer: torch.nn.Conv2d, w: np.ndarray, b: np.ndarray, depthwise: bool) -> None:
    t = g.tflite
    opts = g.options(op, t.DepthwiseConv2DOptions if depthwise else t.Conv2DOptions)
    stride, act = opts.StrideH(), opts.FusedActivationFunction()
    same = opts.Padding() == t.Padding.SAME
    k = layer.kernel_size[0]
    # Our layers: SAME stride 1 = symmetric padding k//2; SAME stride 2 = padding 0 after _same_pad; VALID = 0.
    expect_pad = k // 2 if (same and stride == 1) else 0
    if (stride, act, layer.padding[0]) != (layer.stride[0], 0, expect_pad) or (k > 1 and not same and stride != 1):
        raise ValueError(f"conv op (stride {stride}, SAME {same}, activation {act}) does not fit {layer}")
    w = np.transpose(w, (3, 0, 1, 2)) if depthwise else np.transpose(w, (0, 3, 1, 2))  # 1HWO -> O1HW, OHWI -> OIHW
    _assign(layer.weight, w)
    _assign(layer.bias, b)


def _assign(param: torch.Tensor, value: np.ndarray) -> None:
    value = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    if value.numel() != param.numel():
        raise ValueError(f"tensor of {tuple(value.shape)} does not fit parameter of {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(value.reshape(param.shape))


def convert_mesh(data: bytes) -> FaceMesh:
    g = Graph(data)
    model = FaceMesh()
    layers = model.layers()
    ops = g.of("CONV_2D", "DEPTHWISE_CONV_2D", "PRELU")
    if len(ops) != len(layers):
        raise ValueError(f"{len(ops)} parametrised ops in the .tflite, the torch FaceMesh has {len(layers)} layers")
    for (name, consts, op), layer in zip(ops, layers):
        if name == "PRELU":
            if not isinstance(layer, torch.nn.PReLU):
                raise ValueError(f"PRELU op where the torch model has {layer}")
            _assign(layer.weight, consts[1])
        else:
            if not isinstance(layer, torch.nn.Conv2d) or (layer.groups > 1) != (name == "DEPTHWISE_CONV_2D"):
                raise ValueError(f"{name} op where the torch model has {layer}")
            _conv(g, op, layer, consts[1], consts[2], name == "DEPTHWISE_CONV_2D")
    for name, consts, op in g.of("MAX_POOL_2D"):
        o = g.options(op, g.tflite.Pool2DOptions)
        if (o.FilterWidth(), o.StrideW(), o.Padding()) != (2, 2, g.tflite.Padding.VALID):
            raise ValueError("max pools must be 2x2, stride 2, VALID")
    for name, consts, op in g.of("PAD"):
        pads = consts[1]
        if pads[:3].any() or pads[3, 0]:
            raise ValueError(f"PAD {pads.tolist()}: only zero channels appended are supported")
    return model.eval()


def convert_blendshapes(data: bytes) -> tuple[Blendshapes, float]:
    g = Graph(data)
    model = Blendshapes()
    convs = g.of("CONV_2D")
    linears = [model.points_to_tokens, model.embed]
    for b in model.blocks:
        linears += [b.token1, b.token2, b.channel1, b.channel2]
    linears.append(model.out)
    if len(convs) != len(linears):
        raise ValueError(f"{len(convs)} CONV_2D ops in the .tflite, the torch Blendshapes has {len(linears)} linears")
    relu = {id(b.token1) for b in model.blocks} | {id(b.channel1) for b in model.blocks}
    for (_, consts, op), lin in zip(convs, linears):
        act = g.options(op, g.tflite.Conv2DOptions).FusedActivationFunction()
        if act != (g.tflite.ActivationFunctionType.RELU if id(lin) in relu else 0):
            raise ValueError(f"activation {act} of a 1x1 conv does not fit the torch model at {lin}")
        _assign(lin.weight, consts[1].reshape(consts[1].shape[0], -1))
        _assign(lin.bias, consts[2])
    scales = [c[1] for n, c, _ in g.of("MUL") if c[1] is not None and c[1].size == 1]
    gammas = [c[1] for n, c, _ in g.of("MUL") if c[1] is not None and c[1].size > 1]
    eps = {float(c[1]) for n, c, _ in g.of("ADD") if c[1] is not None and c[1].size == 1}
    tokens = [c[0] for n, c, _ in g.of("CONCATENATION") if c[0] is not None]
    norms = [n for b in model.blocks for n in (b.norm1, b.norm2)]
    if len(scales) != 1 or len(gammas) != len(norms) or len(eps) != 1 or len(tokens) != 1:
        raise ValueError("the blendshapes graph does not have the expected scale, layer norms and extra token")
    _assign(model.input_scale, scales[0])
    for norm, gamma in zip(norms, gammas):
        _assign(norm.weight, gamma)
    _assign(model.extra_token, tokens[0])
    eps_value = eps.pop()
    model.set_eps(eps_value)
    return model.eval(), eps_value


def _fields(data: bytes):
    """(field number, wire type, value) of a protobuf message; length-delimited values as bytes."""
    i = 0

    def varint():
        nonlocal i
        shift = out = 0
        while True:
            b = data[i]
            i += 1
            out |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return out

    while i < len(data):
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            yield field, wire, varint()
        elif wire == 1:
            yield field, wire, data[i:i + 8]
            i += 8
        elif wire == 2:
            n = varint()
            yield field, wire, data[i:i + n]
            i += n
        elif wire == 5:
            yield field, wire, data[i:i + 4]
            i += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def read_geometry_metadata(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """GeometryPipelineMetadata -> (canonical mesh vertices (468, 3), Procrustes weights (468,), zero where unused).

    Fields (mediapipe/tasks/cc/vision/face_geometry/proto): canonical_mesh = 1 (Mesh3d: vertex_type 1, vertex_buffer
    3 as packed floats, 5 per vertex: x, y, z, u, v), procrustes_landmark_basis = 2 (landmark_id 1, weight 2)."""
    vertices, weights = None, np.zeros(N_FACE, np.float32)
    for field, wire, value in _fields(data):
        if field == 1 and wire == 2:
            floats = []
            for f2, w2, v2 in _fields(value):
                if f2 == 3:
                    floats.extend(struct.unpack(f"<{len(v2) // 4}f", v2) if w2 == 2 else struct.unpack("<f", v2))
            vertices = np.array(floats, np.float32).reshape(-1, 5)[:, :3]
        elif field == 2 and wire == 2:
            ref = {f2: v2 for f2, _, v2 in _fields(value)}
            weights[ref.get(1, 0)] = struct.unpack("<f", ref[2])[0]
    if vertices is None or vertices.shape != (N_FACE, 3) or not weights.any():
        raise ValueError("geometry metadata: no 468-vertex canonical mesh or no Procrustes weights found")
    return vertices, weights


class Source:
    """Files by name from a folder or a zip bundle (.task/.zip/.whl), with their SHA-256."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.zip = zipfile.ZipFile(path) if path.is_file() else None

    def read(self, name: str) -> tuple[bytes, str]:
        if self.zip is None:
            target = self.path / name
            if not target.exists():
                raise FileNotFoundError(f"{target}: missing from the source folder")
            data = target.read_bytes()
        else:
            members = [m for m in self.zip.namelist() if m.split("/")[-1] == name]
            if not members:
                raise FileNotFoundError(f"{self.path}: no member named {name}")
            data = self.zip.read(members[0])
        return data, hashlib.sha256(data).hexdigest()


def check_with_litert(mesh_data: bytes, mesh: FaceMesh, bs_data: bytes, bs: Blendshapes) -> None:
    from ai_edge_litert.interpreter import Interpreter

    rng = np.random.default_rng(0)
    for data, model, shape in ((mesh_data, mesh, (1, 192, 192, 3)), (bs_data, bs, (1, 146, 2))):
        it = Interpreter(model_content=data)
        it.allocate_tensors()
        x = rng.random(shape, dtype=np.float32) * (1 if len(shape) == 4 else 192)
        it.set_tensor(it.get_input_details()[0]["index"], x)
        it.invoke()
        outs = {tuple(d["shape"]): it.get_tensor(d["index"]) for d in it.get_output_details()}
        with torch.no_grad():
            if isinstance(model, FaceMesh):
                lm, pres = model(torch.from_numpy(x).permute(0, 3, 1, 2))
                ref_lm, ref_p = outs[(1, 1, 1, 3 * N_LANDMARKS)].reshape(-1, 3), outs[(1, 1, 1, 1)].reshape(-1)
                print(f"face mesh vs LiteRT on noise: landmarks max |diff| {np.abs(lm[0].numpy() - ref_lm).max():.2e}"
                      f" px, presence logit {abs(pres.item() - ref_p.item()):.2e}")
            else:
                out = model(torch.from_numpy(x))
                print(f"blendshapes vs LiteRT on random points: max |diff| "
                      f"{np.abs(out[0].numpy() - outs[(52,)]).max():.2e}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", type=Path, help="folder with the .tflite files, or a .task/.zip bundle")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "affextract" / "weights")
    ap.add_argument("--check", action="store_true", help="compare with LiteRT (needs ai-edge-litert)")
    args = ap.parse_args(argv)
    src = Source(args.source)
    licence = {"licence": "Apache-2.0", "licence_file": "LICENSE-mediapipe", "notice_file": "NOTICE-mediapipe",
               "origin": ORIGIN}

    mesh_data, mesh_sha = src.read(MESH_FILE)
    mesh = convert_mesh(mesh_data)
    bs_data, bs_sha = src.read(BLENDSHAPE_FILE)
    bs, eps = convert_blendshapes(bs_data)
    meta_data, meta_sha = src.read(GEOMETRY_FILE)
    canonical, weights = read_geometry_metadata(meta_data)

    digest = write_weights(
        mesh.state_dict(), args.out / "mediapipe_face_mesh_v2.safetensors", MEDIAPIPE_FORMAT, half=False,
        record={"model": "FaceMesh", "source": MESH_FILE, "source_sha256": mesh_sha, **licence,
             "input": "(B, 3, 192, 192) RGB in [0, 1]",
             "outputs": f"landmarks (B, {N_LANDMARKS}, 3) crop pixels; presence logit (B,)"})
    print(f"wrote mediapipe_face_mesh_v2.safetensors  sha256 {digest}")
    digest = write_weights(
        bs.state_dict(), args.out / "mediapipe_blendshapes.safetensors", MEDIAPIPE_FORMAT, half=True,
        record={"model": "Blendshapes", "source": BLENDSHAPE_FILE, "source_sha256": bs_sha, **licence,
             "config": {"eps": eps}, "landmarks": list(BLENDSHAPE_LANDMARKS), "names": list(BLENDSHAPE_NAMES)})
    print(f"wrote mediapipe_blendshapes.safetensors   sha256 {digest}")
    digest = write_weights(
        {"canonical": torch.from_numpy(canonical), "weights": torch.from_numpy(weights)},
        args.out / "mediapipe_face_geometry.safetensors", MEDIAPIPE_FORMAT, half=False,
        record={"model": "FaceGeometry", "source": GEOMETRY_FILE, "source_sha256": meta_sha, **licence,
             "tensors": "canonical (468, 3) vertices in cm, x to the subject's left, y up, z out of the face; "
                        "weights (468,) MediaPipe's Procrustes landmark weights (0 = unused)"})
    print(f"wrote mediapipe_face_geometry.safetensors sha256 {digest} "
          f"({int((weights > 0).sum())} weighted landmarks)")
    if args.check:
        check_with_litert(mesh_data, mesh, bs_data, bs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
