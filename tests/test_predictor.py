"""The shared inference core on real tiny models: temperature, test-time augmentation, ensembles, OOD scores."""

from __future__ import annotations

import copy

import pytest
import torch

from models.bundle import BundleError, load_model, save_bundle
from models.ensemble import load_ensemble, parse_paths
from models.ood import energy
from models.pet_classifier import PetClassifier
from models.predictor import Member, Predictor, tta_views
from models.runtime import Runtime, fold_batchnorm
from models.transforms import default_preprocess

CPU = Runtime(torch.device("cpu"))
ENERGY = {"score": "energy", "threshold": -1.2, "scale": 0.3}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(5, 3, 64, 64)


@pytest.fixture(scope="module")
def second_bundle(tmp_path_factory, class_names) -> str:
    """Another tiny model (other weights), calibrated with temperature 2 and an energy detector."""
    torch.manual_seed(7)
    model = PetClassifier(len(class_names), arch="resnet18").eval()
    path = tmp_path_factory.mktemp("second") / "second.pt"
    save_bundle(path, model, class_names, default_preprocess(64), calibration={"temperature": 2.0}, ood=ENERGY)
    return str(path)


def predictor_for(*paths) -> Predictor:
    """Built from its pieces on purpose (unfolded, NCHW): the reference below runs the bundle's model by hand."""
    ensemble = load_ensemble([str(p) for p in paths])
    return Predictor([Member.from_bundle(bundle, CPU) for bundle in ensemble.bundles], CPU)


def reference(path, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bundle's own model run by hand: calibrated probabilities and calibrated logits."""
    model, bundle = load_model(path)
    with torch.inference_mode():
        logits = model(images) / bundle.temperature
    return torch.softmax(logits, dim=1), logits


def test_one_view_is_the_plain_prediction(tiny_bundle_path, images):
    predictor = predictor_for(tiny_bundle_path)
    assert len(tta_views(images, "none")) == 1
    assert torch.equal(predictor.predict(images, "none").probs, predictor(images).probs)


def test_flip_averages_the_image_and_its_mirror(tiny_bundle_path, images):
    predictor = predictor_for(tiny_bundle_path)
    expected = (predictor(images).probs + predictor(images.flip(-1)).probs) / 2
    assert torch.allclose(predictor.predict(images, "flip").probs, expected, atol=1e-6)
    with pytest.raises(ValueError, match="valid choices: none, flip"):
        tta_views(images, "rotate")


def test_an_ensemble_of_one_is_that_bundle(second_bundle, images):
    ensemble = load_ensemble(second_bundle)
    output = predictor_for(second_bundle)(images)
    probs, logits = reference(second_bundle, images)
    assert torch.allclose(output.probs, probs, atol=1e-6)
    assert torch.allclose(output.ood_scores, energy(logits), atol=1e-5)  # the raw score: one member
    assert ensemble.version == ensemble.bundles[0].version
    assert ensemble.ood()["threshold"] == ENERGY["threshold"]


def test_an_ensemble_of_two_averages_calibrated_members(tiny_bundle_path, second_bundle, images):
    both = predictor_for(tiny_bundle_path, second_bundle)
    (first, _), (second, _) = reference(tiny_bundle_path, images), reference(second_bundle, images)
    assert torch.allclose(both(images).probs, (first + second) / 2, atol=1e-6)
    assert both(images).ood_scores is None, "a member without a detector: the ensemble has none"
    versions = {
        load_ensemble([a, b]).version for a, b in ((tiny_bundle_path, second_bundle), (second_bundle, tiny_bundle_path))
    }
    assert len(versions) == 1 and versions != {load_ensemble(second_bundle).version}, "order-free, its own version"


def test_ensemble_ood_scores_are_mean_normalised_margins(tmp_path, second_bundle, images, class_names):
    torch.manual_seed(3)
    other = tmp_path / "third.pt"
    ood = {"score": "energy", "threshold": -0.8, "scale": 0.5}
    save_bundle(other, PetClassifier(3, arch="resnet18").eval(), class_names, default_preprocess(64), ood=ood)
    both = predictor_for(second_bundle, other)
    margins = [
        (energy(reference(path, images)[1]) - entry["threshold"]) / entry["scale"]
        for path, entry in ((second_bundle, ENERGY), (other, ood))
    ]
    assert both.threshold == 0.0
    assert torch.allclose(both(images).ood_scores, (margins[0] + margins[1]) / 2, atol=1e-5)


def test_batched_rows_equal_single_images(second_bundle, images):
    predictor = predictor_for(second_bundle)
    batched = predictor(images)
    for index, row in enumerate(batched):
        single = predictor(images[index : index + 1])
        assert torch.allclose(row.probs, single.probs, atol=1e-4)
        assert torch.allclose(row.ood_scores, single.ood_scores, atol=1e-4)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"class_names": ["cat", "dog", "fox"]}, "disagree on class_names"),
        ({"preprocess": default_preprocess(96)}, "disagree on preprocess"),
    ],
)
def test_members_must_share_classes_and_preprocessing(
    tmp_path, tiny_model, class_names, tiny_bundle_path, changes, message
):
    other = tmp_path / "other.pt"
    fields = {"class_names": class_names, "preprocess": default_preprocess(64), **changes}
    save_bundle(other, tiny_model, fields["class_names"], fields["preprocess"])
    with pytest.raises(BundleError, match=message) as info:
        load_ensemble(f"{tiny_bundle_path},{other}")
    assert str(other) in str(info.value)


@pytest.mark.parametrize(("text", "message"), [("a.pt,,b.pt", "empty bundle path"), ("a.pt, a.pt", "more than once")])
def test_model_path_lists_are_checked(text, message):
    with pytest.raises(ValueError, match=message):
        parse_paths(text)
    assert parse_paths(" a.pt , b.pt ") == ("a.pt", "b.pt")


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_folding_batchnorm_keeps_the_outputs_and_the_split(arch, images):
    """build_handler folds BatchNorms into convolutions and runs channels-last on the CPU: the same network."""
    torch.manual_seed(3)
    model = PetClassifier(3, arch=arch, weights="none").eval()
    for module in model.modules():  # non-trivial statistics, so a wrong fold would show
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5), module.running_var.uniform_(0.5, 2.0)
    with torch.inference_mode():
        expected, features = model(images), model.backbone(images)
    folded = copy.deepcopy(model)
    assert fold_batchnorm(folded) > 0
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    runtime = Runtime(torch.device("cpu"), channels_last=True)
    runtime.place(folded)
    with torch.inference_mode():
        batch = runtime.to_device(images)
        assert torch.allclose(folded(batch), expected, atol=1e-4)
        assert torch.allclose(folded.backbone(batch), features, atol=1e-4)
