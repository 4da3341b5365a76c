"""A1111's training routes: POST /sdapi/v1/create/embedding, /sdapi/v1/create/hypernetwork, /sdapi/v1/train/embedding
and /sdapi/v1/train/hypernetwork, with its field names and its answers ({"info": "..."}, also for a run that fails as
it runs), and what /progress and /interrupt say and do while one trains.

Training runs on the worker like every job: the request answers when it ends (as A1111's), /sdapi/v1/progress shows
its step and loss meanwhile, and the caller's /sdapi/v1/interrupt stops it (what it trains is saved as it stands).
Bad input is refused with 422 and what to fix, before anything is queued.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from fastapi import Request
from pydantic import BaseModel

from webui.api.convert import ApiError, encode_image
from webui.api.models import ProgressResponse
from webui.engine.training import TrainingPlan
from webui.hypernetwork_training import (
    NewHypernetwork, TrainHypernetwork, create_hypernetwork, plan_hypernetwork_training,
)
from webui.schemas import InvalidRequest
from webui.textual_inversion import NewEmbedding, TrainEmbedding, plan_training, queue_new_embedding
from webui.training import FAILED, TrainingRun
from webui.worker import WorkerStopped, await_result

log = logging.getLogger(__name__)


class CreateResponse(BaseModel):
    info: str


class TrainResponse(BaseModel):
    info: str


class TrainingRoutes:
    """The routes' handlers, and the API's training runs not yet finished (for /interrupt), for one server."""

    def __init__(self, services, caller_of: Callable[[Request], str]):
        self.services = services
        self.caller_of = caller_of
        self.runs: list[TrainingRun] = []

    def add_routes(self, add: Callable, prefix: str) -> None:
        add(f"{prefix}/create/embedding", self.create_embedding, methods=["POST"], response_model=CreateResponse,
            tags=["training"], summary="create an embedding (textual inversion) from an initialization text")
        add(f"{prefix}/create/hypernetwork", self.create_hypernetwork, methods=["POST"], response_model=CreateResponse,
            tags=["training"], summary="create a hypernetwork (its networks freshly initialized)")
        add(f"{prefix}/train/embedding", self.train_embedding, methods=["POST"], response_model=TrainResponse,
            tags=["training"], summary="train an embedding on a folder of pictures; answers when it ends")
        add(f"{prefix}/train/hypernetwork", self.train_hypernetwork, methods=["POST"], response_model=TrainResponse,
            tags=["training"], summary="train a hypernetwork on a folder of pictures; answers when it ends")

    async def create_embedding(self, body: NewEmbedding) -> CreateResponse:
        folder = self.services.settings.embeddings_folder
        try:
            path = await _result(lambda: queue_new_embedding(self.services.worker, body, folder))
        except InvalidRequest as err:
            raise ApiError(422, str(err), "InvalidRequest") from None
        return CreateResponse(info=f"create embedding filename: {path}")

    def create_hypernetwork(self, body: NewHypernetwork) -> CreateResponse:
        """(A plain def: FastAPI runs it on its threads; it needs no model, so not the worker.)"""
        try:
            path = create_hypernetwork(body, self.services.settings.hypernetwork_folder, self.services.worker.training)
        except InvalidRequest as err:
            raise ApiError(422, str(err), "InvalidRequest") from None
        return CreateResponse(info=f"create hypernetwork filename: {path}")

    async def train_embedding(self, body: TrainEmbedding, request: Request) -> TrainResponse:
        return await self._train(lambda: plan_training(body, self.services.settings, origin="api"), request)

    async def train_hypernetwork(self, body: TrainHypernetwork, request: Request) -> TrainResponse:
        return await self._train(lambda: plan_hypernetwork_training(body, self.services.settings, origin="api"),
                                 request)

    async def _train(self, plan_of: Callable[[], TrainingPlan], request: Request) -> TrainResponse:
        try:
            plan = plan_of()
        except InvalidRequest as err:
            raise ApiError(422, str(err), "InvalidRequest") from None
        run = TrainingRun(plan, origin="api", owner=self.caller_of(request))
        self.runs.append(run)
        try:
            await _result(lambda: self.services.worker.train(run))
        except InvalidRequest as err:  # found once it ran: a picture, the embedding, the model
            raise ApiError(422, str(err), "InvalidRequest") from None
        except Exception:
            if run.state != FAILED:  # not the run's own failure
                raise
            # As A1111: the answer is the run's, with what broke in its info (a file that could not be written...)
            log.exception("training %s %s failed", plan.kind, plan.name)
        finally:
            self.runs.remove(run)
        return TrainResponse(info=run.api_info())

    def interrupt(self, caller: str, running_only: bool = False) -> bool:
        """Stop the caller's training runs: the running one, or with running_only False also those queued; whether
        there was one."""
        running = self.services.worker.training
        mine = [run for run in list(self.runs) if run.owner == caller and (run is running or not running_only)]
        for run in mine:
            run.stop()
        return bool(mine)

    def progress(self, request: Request, skip_current_image: bool = False) -> ProgressResponse | None:
        """The running training's progress, as A1111 reports it (job "train-embedding" or "train-hypernetwork", its
        steps as the job count), whoever's it is; its preview only to the caller who started it. None when none is
        running."""
        run = self.services.worker.training
        if run is None:
            return None
        status, own = run.status, run.origin == "api" and run.owner == self.caller_of(request)
        preview = run.preview_image if own and not skip_current_image else None
        state = {"skipped": False, "interrupted": run.stopped(), "stopping_generation": False,
                 "job": f"train-{run.plan.kind}", "job_count": run.plan.learn_rate.end(run.plan.steps),  # its end
                 "job_no": status.step if status else 0, "job_timestamp": _timestamp(run.started_at),
                 "sampling_step": 0, "sampling_steps": 0, "queued": self.services.worker.queue_length()}
        return ProgressResponse(
            progress=min(run.fraction, 1.0), eta_relative=run.eta_seconds or 0.0, state=state,
            current_image=None if preview is None else encode_image(preview,
                                                                    options=self.services.options.current()),
            textinfo=run.textinfo(), current_task=None)


async def _result(queue: Callable):
    """What the work `queue` puts on the worker gives."""
    try:
        return await await_result(queue())
    except WorkerStopped as err:
        raise ApiError(503, str(err), "ServerStopping") from None


def _timestamp(seconds: float | None) -> str:
    return time.strftime("%Y%m%d%H%M%S", time.localtime(seconds)) if seconds else "0"
