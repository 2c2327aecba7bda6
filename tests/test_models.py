"""Models by name, and BatchNorm buffers: how they travel and how the server combines them."""

import pytest
import torch

from lbgm.common.lookback import average_buffers, decision_units
from lbgm.common.model_spec import describe_model, fingerprint
from lbgm.tasks.models import MODELS, build_model
from lbgm.common.wire import FullLayer, read_update_body, read_update_header, update_parts
from lbgm.server.updates import UpdateRejected, UploadRules, judge_update
from lbgm.v1 import lbgm_pb2 as pb


@pytest.mark.parametrize("name, shape, classes", [
    ("mlp", (1, 28, 28), 10), ("fcn", (1, 28, 28), 10), ("cnn", (1, 28, 28), 10), ("cnn", (3, 32, 32), 100),
    ("resnet18", (3, 32, 32), 10), ("vgg19_bn", (3, 32, 32), 100),
])
def test_every_model_builds_for_its_input_and_classes(name, shape, classes):
    model = build_model(name, seed=0, shape=shape, num_classes=classes)
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(2, *shape)).shape == (2, classes)


def test_reference_cnn_has_the_authors_layer_sizes():
    shapes = [tuple(p.shape) for p in build_model("cnn", 0).parameters()]
    assert shapes == [(20, 1, 5, 5), (20,), (50, 20, 5, 5), (50,), (500, 800), (500,), (10, 500), (10,)]


def test_same_seed_same_weights_and_fingerprint():
    first, second = build_model("cnn", 3), build_model("cnn", 3)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))
    assert (fingerprint(describe_model(first)) == fingerprint(describe_model(second))
            != fingerprint(describe_model(build_model("mlp", 3))))


def test_batchnorm_models_have_buffers_and_plain_ones_do_not():
    assert len(list(build_model("resnet18", 0, (3, 32, 32)).buffers())) == 60  # 20 BatchNorms x 3
    assert not list(build_model("cnn", 0).buffers())


def test_unknown_model_and_too_small_input_are_explained():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("alexnet", 0)
    with pytest.raises(ValueError, match="32x32"):
        build_model("vgg19_bn", 0, (1, 28, 28))
    assert set(MODELS) == {"mlp", "fcn", "cnn", "resnet18", "vgg19_bn"}


def test_buffers_average_by_weight_and_counters_by_maximum():
    worker_a = [torch.tensor([0.0, 2.0]), torch.tensor(5)]
    worker_b = [torch.tensor([4.0, 6.0]), torch.tensor(9)]
    mean, count = average_buffers([worker_a, worker_b], [0.25, 0.75])
    assert torch.allclose(mean, torch.tensor([3.0, 5.0])) and int(count) == 9


BN_RULES = UploadRules(layer_shapes=((3,),), units=tuple(decision_units(1, "layer")), dense_dtype=torch.float32,
                       codec=pb.DENSE, buffer_specs=(((3,), torch.float32), ((), torch.int64)))


def upload(buffers):
    header = pb.UpdateHeader(round=1, num_samples=4)
    stream = iter(update_parts(header, [FullLayer.dense(0, 1, torch.ones(3))], [], buffers))
    update = read_update_body(read_update_header(stream), stream, 1 << 20)
    return update, judge_update(update, 1, BN_RULES, {})


def test_buffers_travel_with_the_upload_and_are_counted_apart():
    buffers = [torch.tensor([0.5, 1.5, 2.5]), torch.tensor(7)]
    update, accepted = upload(buffers)
    assert all(torch.equal(a, b) for a, b in zip(accepted.buffers, buffers))
    assert update.bytes_by_kind["buffer"] > 0 and update.bytes_by_kind["full"] > 0


@pytest.mark.parametrize("buffers, message", [
    ([torch.zeros(3)], "expected model buffers 0..1"),
    ([torch.zeros(4), torch.tensor(1)], "expected torch.float32"),
    ([torch.tensor([0.0, float("nan"), 0.0]), torch.tensor(1)], "NaN"),
])
def test_missing_or_malformed_buffers_are_refused(buffers, message):
    with pytest.raises(UpdateRejected, match=message):
        upload(buffers)
