"""The training job spec: the body of `POST /v1/jobs`, validated the same way for the API and the CLI."""

from __future__ import annotations

import copy
import json
from typing import TYPE_CHECKING, Annotated, Any, Literal, Optional

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

ModelKind = Literal["baseline", "transfer"]
Augmentation = Literal["flip", "rotate", "zoom", "translate", "contrast"]
CIFAR10 = "cifar10"
#: CIFAR-10's defaults and floors for the subset sizes (an uploaded dataset's default is all of it, floor 1).
CIFAR10_SAMPLES = {"train_samples": (5000, 100), "test_samples": (1000, 100)}
ALPHAS: tuple[float, ...] = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)


def _known_alpha(value: float) -> float:
    if value not in ALPHAS:
        raise ValueError(f"must be one of {', '.join(map(str, ALPHAS))} (the widths ImageNet weights exist for)")
    return value


# A float restricted to MobileNetV2's published widths (`Literal` cannot hold floats for type checkers). Its
# schema gives the range and lists the widths as examples: client generators refuse an enum of numbers.
Alpha = Annotated[float, AfterValidator(_known_alpha), WithJsonSchema(
    {"type": "number", "minimum": ALPHAS[0], "maximum": ALPHAS[-1], "examples": list(ALPHAS)})]

CLASS_NAMES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)

#: Fields that only mean something for the transfer model; a baseline job that sets one is refused.
TRANSFER_FIELDS: tuple[str, ...] = (
    "image_size", "alpha", "dropout", "dense_units",
    "fine_tune_layers", "fine_tune_epochs", "fine_tune_learning_rate",
)


def _document_job_create(schema: dict[str, Any]) -> None:
    """JobCreate's JSON schema: examples, and no `default` on the transfer-only fields (said in their description
    instead), so a generated client leaves them out of a baseline job, which may not set them."""
    schema["examples"] = [
        {"model": "transfer", "train_samples": 5000, "test_samples": 1000, "epochs": 10, "seed": 42},
        {"model": "baseline", "epochs": 10, "batch_size": 32, "name": "cnn-from-scratch"},
    ]
    for name in TRANSFER_FIELDS:
        field = schema["properties"][name]
        if "default" in field:
            field["description"] = f"{field.get('description', '')}; default {json.dumps(field.pop('default'))}"


class JobCreate(BaseModel):
    """A training job request. Unknown fields are refused; defaults reproduce the reference experiment."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=lambda schema: _document_job_create(schema))

    model: ModelKind = Field(description="small CNN from scratch, or ImageNet MobileNetV2 base + new head")
    dataset: str = Field(CIFAR10, pattern=r"^[A-Za-z0-9_-]{1,64}$",
                         description="`cifar10` or the id of a `ready` uploaded dataset")
    train_samples: int | None = Field(None, ge=1, le=50000, validate_default=True, description=(
        "seeded random subset of the training split (stratified on uploaded datasets); "
        "default 5000 on cifar10 (at least 100), all on uploaded datasets"))
    test_samples: int | None = Field(None, ge=1, le=10000, validate_default=True, description=(
        "seeded random subset of the test split; default 1000 on cifar10 (at least 100), all on uploaded datasets"))
    epochs: int = Field(10, ge=1, le=200)
    batch_size: int = Field(32, ge=8, le=1024)
    learning_rate: float = Field(0.001, gt=0, le=1, description="Adam")
    seed: int = Field(42, ge=0, le=2**31 - 1, description="same seed + spec -> same subset and initial weights")
    name: str | None = Field(None, max_length=64, description="label for the resulting model")
    image_size: int = Field(96, ge=32, le=224, description="transfer only: 32x32 input resized to this")
    alpha: Alpha = Field(1.0, description="transfer only: MobileNetV2 width multiplier, one of "
                                       + ", ".join(map(str, ALPHAS)))
    dropout: float = Field(0.5, ge=0, le=0.9, description="transfer only")
    dense_units: list[Annotated[int, Field(ge=1, le=4096)]] = Field(
        default_factory=lambda: [128, 64], min_length=0, max_length=4,
        description="transfer only: hidden dense layers of the head (each 1..4096)",
    )
    fine_tune_layers: int = Field(0, ge=0, le=1000, description="transfer only: top base layers unfrozen")
    fine_tune_epochs: int = Field(0, ge=0, le=200, description="transfer only")
    fine_tune_learning_rate: float = Field(0.00001, gt=0, le=1, description="transfer only")
    class_weight: Literal["balanced"] | None = Field(
        None, description="`balanced` weights each class's loss by n_samples / (n_classes * n_class)")
    augment: list[Augmentation] = Field(
        default_factory=list, max_length=5,
        description="random augmentation of training images; features of the augmented views are cached too")

    @model_validator(mode="after")
    def _check(self) -> JobCreate:
        if self.model == "baseline":
            given = sorted(set(TRANSFER_FIELDS) & self.model_fields_set)
            if given:
                raise ValueError(f"{', '.join(given)}: transfer-only field(s), not allowed for a baseline job")
        if len(set(self.augment)) != len(self.augment):
            raise ValueError("augment: each augmentation at most once")
        return self

    @field_validator("train_samples", "test_samples")
    @classmethod
    def _cifar10_samples(cls, value: int | None, info: ValidationInfo) -> int | None:
        if info.data.get("dataset") != CIFAR10:
            return value
        default, floor = CIFAR10_SAMPLES[str(info.field_name)]
        if value is None:
            return default
        if value < floor:
            raise ValueError(f"at least {floor} on cifar10")
        return value

    @property
    def uploaded(self) -> bool:
        """Trained on an uploaded dataset rather than the built-in CIFAR-10."""
        return self.dataset != CIFAR10

    @property
    def fine_tuning(self) -> bool:
        return self.model == "transfer" and self.fine_tune_layers > 0 and self.fine_tune_epochs > 0

    @property
    def total_epochs(self) -> int:
        return self.epochs + (self.fine_tune_epochs if self.fine_tuning else 0)

    def public(self) -> dict[str, Any]:
        """The spec as stored and shown: every default filled in, transfer fields only for transfer jobs."""
        data = self.model_dump(mode="json")
        if self.model == "baseline":
            for field in TRANSFER_FIELDS:
                data.pop(field, None)
        return data


def _optional_transfer_field(info: FieldInfo) -> tuple[Any, FieldInfo]:
    """A transfer-only field of `JobCreate` as a recorded spec holds it: absent (None, left out of the JSON) on
    baseline jobs, with the same constraints otherwise."""
    field = copy.copy(info)
    field.default = None
    field.default_factory = None
    field.exclude_if = _is_none
    return Optional[info.annotation], field  # noqa: UP045 (the annotation is only known at run time)


def _is_none(value: Any) -> bool:
    return value is None


if TYPE_CHECKING:
    class JobSpec(BaseModel):
        """(Built from `JobCreate` below; for type checkers, a model with extra fields.)"""

        model_config = ConfigDict(extra="allow")
else:
    #: A job's spec as recorded and shown (Job `spec`, Model `spec`): `JobCreate`'s fields with every default
    #: filled in, the transfer-only ones on transfer jobs only, fields of other versions kept as they are.
    JobSpec = create_model(
        "JobSpec",
        __config__=ConfigDict(extra="allow"),
        __doc__="The job request as recorded: every default filled in, transfer-only fields on transfer jobs only.",
        **{name: (_optional_transfer_field(info) if name in TRANSFER_FIELDS else (info.annotation, copy.copy(info)))
           for name, info in JobCreate.model_fields.items()},
    )
