"""Table definitions. Alembic migrations under ``selfie_lora/migrations`` create the same schema."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# The one-active-training rule lives in the database, not only in the service, so two processes
# that both pass the service's check still cannot both insert.
ACTIVE_STATUS_SQL = "status IN ('queued', 'starting', 'processing')"

# Columns migration 0011 widened on PostgreSQL, which enforces widths, and left as they were on
# SQLite, which does not: its INTEGER holds 64 bits and it never checks a VARCHAR's length, and
# it could change a declared type only by copying the tables that others' foreign keys point at.
# The variants say what each database holds, so the schema the migrations make is this one.
SEED = BigInteger().with_variant(Integer(), "sqlite")  # seeds are unsigned 32-bit (MAX_SEED)
UNBOUNDED_TEXT = Text().with_variant(String(200), "sqlite")


class Base(DeclarativeBase):
    pass


class UserRow(Base):
    __tablename__ = "users"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    # Unused since 0005 (keys live in api_keys); it holds "unused:<user id>", because SQLite
    # cannot drop a UNIQUE column without copying the table that everything refers to.
    api_key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # An argon2 hash (it names its own parameters); None: this user signs in with API keys only.
    password_hash: Mapped[str | None] = mapped_column(String(255), nullable=True, default=None)
    # The name case-folded (domain.accounts.fold_name), unique: "Ann" and "ann" are one name.
    # Nullable only because SQLite could not make it NOT NULL without copying the table (0013).
    name_folded: Mapped[str | None] = mapped_column(String(100), nullable=True)
    # When the operator disabled the account (``users disable``); None: it may sign in.
    disabled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True,
                                                         default=None)
    # What ``users delete`` has yet to delete in storage once it deleted the user's rows
    # (domain.accounts.ErasurePlan as JSON), stored with that deletion so a rerun finishes it.
    erasure_plan: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True,
                                                                default=None)
    # When a deletion of the account was asked for, set with its disabling: one whose process
    # died is finished by the periodic collection (services.erasure.AccountEraser.finish_pending).
    # Indexed (0025): that check, run by every worker, and gc's list of the pending ones filter
    # and sort on it, and went through every user without.
    erasure_requested_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True, default=None, index=True)
    __table_args__ = (Index("ux_users_name_folded", "name_folded", unique=True),)


class WebSessionRow(Base):
    __tablename__ = "web_sessions"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # SHA-256 of the cookie's token
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class SignInFailureRow(Base):
    """One failed sign-in, under the name tried and under the client's address (two rows), so
    that every API server counts the same attempts."""

    __tablename__ = "sign_in_failures"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(200))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    __table_args__ = (Index("ix_sign_in_failures_key_at", "key", "at"),)


class ApiKeyRow(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # When the key stops working: a rotated key's lies ahead (the rotation's grace) and
    # ``replaced_by`` names the key that replaced it.
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    replaced_by: Mapped[str | None] = mapped_column(String(36), nullable=True)
    # The SHA-256 of the settings page form's one-time nonce that made it (None: made otherwise):
    # the form sent again finds its key made and makes no other.
    form_nonce_hash: Mapped[str | None] = mapped_column(String(64), nullable=True, default=None)
    __table_args__ = (Index("ux_api_keys_form_nonce_hash", "form_nonce_hash", unique=True),)


class ModelRow(Base):
    __tablename__ = "models"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    # One model per user for now: unique, so two concurrent first trainings create one model.
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), unique=True)
    backend: Mapped[str] = mapped_column(String(20))
    trigger_word: Mapped[str] = mapped_column(String(32))
    destination: Mapped[str] = mapped_column(String(200), unique=True)
    trainer_version: Mapped[str] = mapped_column(String(300))
    lora_scale: Mapped[float] = mapped_column(Float)
    lora_scale_is_custom: Mapped[bool] = mapped_column(Boolean)
    active_version_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # The likeness probe set (prompt + seed each), fixed when the model is made. Null for models
    # made before 0002, filled in at their next scoring.
    probes: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)


class DatasetRow(Base):
    __tablename__ = "datasets"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    images_total: Mapped[int] = mapped_column(Integer)
    images_accepted: Mapped[int] = mapped_column(Integer)
    photo_hashes: Mapped[list[str]] = mapped_column(JSON)
    findings: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    accepted: Mapped[bool] = mapped_column(Boolean)
    sha256: Mapped[str] = mapped_column(String(64))
    verdict: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # One [left, top, right, bottom] (fractions) or null per photo, aligned with photo_hashes.
    # Null for datasets stored before 0008.
    face_boxes: Mapped[list[list[float] | None] | None] = mapped_column(JSON, nullable=True)


class TrainingRow(Base):
    __tablename__ = "trainings"
    __table_args__ = (
        Index(
            "uq_trainings_one_active_per_model",
            "model_id",
            unique=True,
            sqlite_where=text(ACTIVE_STATUS_SQL),
            postgresql_where=text(ACTIVE_STATUS_SQL),
        ),
    )
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"))
    backend: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(20))
    is_retraining: Mapped[bool] = mapped_column(Boolean)
    trigger_word: Mapped[str] = mapped_column(String(32))
    destination: Mapped[str] = mapped_column(String(200))
    trainer_version: Mapped[str] = mapped_column(String(300))
    recipe: Mapped[dict[str, Any]] = mapped_column(JSON)
    preserved: Mapped[dict[str, Any]] = mapped_column(JSON)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer, default=0)
    remote_id: Mapped[str | None] = mapped_column(String(100), nullable=True)
    version_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Built from the trainer's output (file names in Replicate's archive): no bound of ours.
    weights_method: Mapped[str | None] = mapped_column(UNBOUNDED_TEXT, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    remote_cancel_pending: Mapped[bool] = mapped_column(Boolean, server_default=false())
    remote_create_started: Mapped[bool] = mapped_column(Boolean, server_default=false())
    remote_marker: Mapped[str | None] = mapped_column(Text, nullable=True)
    progressed: Mapped[bool] = mapped_column(Boolean, server_default=false())
    history: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    loss_curve: Mapped[list[list[float]] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # The lease (domain.lease): who runs it, which attempt, until when, last heartbeat.
    attempt: Mapped[int] = mapped_column(Integer, server_default="0")
    recoveries: Mapped[int] = mapped_column(Integer, server_default="0")
    lease_owner: Mapped[str | None] = mapped_column(String(200), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True),
                                                              nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class UploadClaimRow(Base):
    """A user's upload that will start a training, while its photos are checked: a second
    upload or start of that user gets 409 before anything of it is stored. It expires on its
    own, so a process that died holding it blocks nobody for long."""

    __tablename__ = "upload_claims"
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), primary_key=True)
    token: Mapped[str] = mapped_column(String(36))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class WebhookDeliveryRow(Base):
    """Every webhook id received, so a replayed delivery is refused."""

    __tablename__ = "webhook_deliveries"
    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class VersionRow(Base):
    __tablename__ = "versions"
    __table_args__ = (UniqueConstraint("model_id", "number", name="uq_versions_model_number"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    training_id: Mapped[str] = mapped_column(ForeignKey("trainings.id"), unique=True)
    trainer_version: Mapped[str] = mapped_column(String(300))
    weights_key: Mapped[str] = mapped_column(String(300))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    weights_method: Mapped[str] = mapped_column(UNBOUNDED_TEXT)
    remote_version: Mapped[str | None] = mapped_column(String(300), nullable=True)
    version_mismatch: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # The likeness gate: pending | passed | held. Versions from before 0002 were activated on
    # success, hence the server default. Indexed (0026): the reconcile pass of every worker
    # (every 10 s) reads the pending ones of ended trainings, and went through every version.
    gate_status: Mapped[str] = mapped_column(String(10), server_default="passed", index=True)
    gate_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    gate_details: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    alert: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # When the alert is next due to be sent (domain.alerts); NULL: nothing to send.
    alert_due_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True,
                                                          index=True)


class VersionLikenessRow(Base):
    """One version's likeness record (see ``domain.quality.VersionLikeness``)."""

    __tablename__ = "version_quality"
    version_id: Mapped[str] = mapped_column(ForeignKey("versions.id"), primary_key=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    status: Mapped[str] = mapped_column(String(10))
    embedding_model: Mapped[str | None] = mapped_column(String(100), nullable=True)
    reference_dataset_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    # The headline scores as columns (queries, charts); every figure is in ``scores`` too.
    identity: Mapped[float | None] = mapped_column(Float, nullable=True)
    identity_nearest: Mapped[float | None] = mapped_column(Float, nullable=True)
    face_share: Mapped[float | None] = mapped_column(Float, nullable=True)
    sane_share: Mapped[float | None] = mapped_column(Float, nullable=True)
    sharpness: Mapped[float | None] = mapped_column(Float, nullable=True)
    scores: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    probes: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    training: Mapped[dict[str, Any]] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    scored_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class GenerationRow(Base):
    __tablename__ = "generations"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"))
    version_id: Mapped[str] = mapped_column(ForeignKey("versions.id"))
    prompt: Mapped[str] = mapped_column(Text)
    lora_scale: Mapped[float] = mapped_column(Float)
    seed: Mapped[int | None] = mapped_column(SEED, nullable=True)
    image_keys: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # The batch places (0-based) of the pictures the generator withheld.
    withheld: Mapped[list[int]] = mapped_column(JSON, server_default="[]")


class EventRow(Base):
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[str] = mapped_column(String(36), index=True)
    kind: Mapped[str] = mapped_column(String(50))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class JobLeaseRow(Base):
    """A periodic job that one process at a time runs (the garbage collection): the lease of the
    process running it, and when it last started, so that every worker knows when it is due."""

    __tablename__ = "job_leases"
    name: Mapped[str] = mapped_column(String(50), primary_key=True)
    owner: Mapped[str | None] = mapped_column(String(200), nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True),
                                                             nullable=True)
    last_finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True),
                                                              nullable=True)


class WorkerRow(Base):
    """A worker that consumes the queue, as it last said it was alive: it pushes ``expires_at``
    every heartbeat while it runs and deletes its row when it stops, so /metrics (whichever
    server answers) counts the live ones, and a row past its expiry is a worker that died."""

    __tablename__ = "workers"
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class DeploymentRow(Base):
    """The deployment this database belongs to: one row, whose id the blob store's marker names
    too (``services.deployment``), so that a collector never deletes another deployment's
    blobs. ``singleton`` is always 1: a second row cannot be inserted, so processes that create
    the id at once all read back the first one's."""

    __tablename__ = "deployment"
    __table_args__ = (CheckConstraint("singleton = 1", name="deployment_singleton"),)
    singleton: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    id: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    # The id of the marker of the store the deployment was bound to (``services.deployment``):
    # a process whose store carries another marker, or none, is given another storage. NULL
    # until the first start that binds a store (or, on a deployment bound before, adopts one).
    storage_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
