"""ensemble.py: the composed graph returns log(weighted mean softmax) of its members, keeps the product's contract,
and refuses a member with another contract. No PyTorch: the members are small ONNX graphs built here.

    python -m unittest models.train.test_ensemble
"""
from __future__ import annotations

import unittest

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from models.train import ensemble


def member(scale: np.ndarray, bias: np.ndarray, in_shape=(1, 256, 256)) -> onnx.ModelProto:
    """A stand-in U-Net: scores[:, c] = scale[c] * ct + bias[c] (a 1x1 convolution), opset 17."""
    w = numpy_helper.from_array(scale.reshape(3, in_shape[0], 1, 1).astype(np.float32), "w")
    b = numpy_helper.from_array(bias.astype(np.float32), "b")
    x = helper.make_tensor_value_info("ct", TensorProto.FLOAT, ["n", *in_shape])
    y = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", 3, *in_shape[1:]])
    g = helper.make_graph([helper.make_node("Conv", ["ct", "w", "b"], ["scores"])], "m", [x], [y], [w, b])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"ct": x})[0]


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


class EnsembleTest(unittest.TestCase):
    def setUp(self) -> None:
        rng = np.random.default_rng(7)
        self.x = rng.random((2, 1, 256, 256), dtype=np.float32)
        self.a = member(np.array([2.0, -1.0, 3.0]), np.array([0.1, 0.5, -1.0]))
        self.b = member(np.array([-3.0, 1.0, 0.5]), np.array([1.0, -0.2, 0.3]))

    def test_scores_are_the_log_of_the_weighted_mean_probability(self) -> None:
        pa, pb = softmax(run(self.a, self.x)), softmax(run(self.b, self.x))
        for weights in ([1.0, 1.0], [1.0, 3.0]):
            got = run(ensemble.compose([self.a, self.b], weights), self.x)
            wa, wb = weights[0] / sum(weights), weights[1] / sum(weights)
            want = np.log(wa * pa + wb * pb + ensemble.EPS)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
            # read as logits, as the product reads them: softmax gives back the mean probability
            np.testing.assert_allclose(softmax(got), wa * pa + wb * pb, atol=1e-4)

    def test_a_lone_member_keeps_its_argmax(self) -> None:
        got = run(ensemble.compose([self.a], [1.0]), self.x)
        np.testing.assert_array_equal(got.argmax(1), run(self.a, self.x).argmax(1))

    def test_the_composed_model_keeps_the_contract(self) -> None:
        g = ensemble.compose([self.a, self.b], [1.0, 1.0]).graph
        self.assertEqual([i.name for i in g.input], ["ct"])
        self.assertEqual([o.name for o in g.output], ["scores"])
        ensemble.check_member(ensemble.compose([self.a, self.b], [1.0, 1.0]), "composed")

    def test_refuses_another_contract_and_bad_weights(self) -> None:
        wide = member(np.ones(6), np.zeros(3), in_shape=(2, 256, 256))
        with self.assertRaises(SystemExit):
            ensemble.check_member(wide, "2.5D member")
        with self.assertRaises(ValueError):
            ensemble.compose([self.a, self.b], [1.0])
        with self.assertRaises(ValueError):
            ensemble.compose([self.a, self.b], [1.0, -1.0])


if __name__ == "__main__":
    unittest.main()
