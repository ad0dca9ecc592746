"""`spearfl live-demo`: a simulation's rounds run through the live path, to set beside the in-process run.

One device service per client starts in this process (each with its own copy of the model and its own store),
and the server loop drives them over HTTP as it would drive people's devices (`live.devices`). Before each
round, simulated people on each chosen device ask, through the service's API, exactly the questions the
in-process simulation would draw for that client and round (the same seeded draw from the same partition),
judge the answers with the config's feedback provider and judge the revisions; the round then trains on those
judged interactions. What differs from the in-process run is only the live path itself: the answers are
sampled by the service's engine (its own seeds, its own batches, over HTTP, stored and read back), so held-out
curves agree in trend, not draw by draw.
"""

from __future__ import annotations

from pathlib import Path

from spearfl.algorithms.base import sample_examples
from spearfl.config import RunConfig
from spearfl.runtime.devices import DeviceClients
from spearfl.runtime.server import FederatedRun, choose_clients
from spearfl.runtime.setup import build_context, client_feedback
from spearfl.seeds import derive_seed
from spearfl.serve.device import ServiceThread, build_service
from spearfl.serve.simulate import round_robin, simulate_people


def people_first(people: int):
    """A DeviceClients runner whose chosen devices first hear their round's questions from simulated people."""

    class PeopleFirst(DeviceClients):
        def __init__(self, context, federation, progress):
            super().__init__(context, federation, progress)
            self.federation, self.judge = federation, client_feedback(context.config)
            self.tallies = []

        def choose(self, round_index: int) -> list[int]:
            config = self.config
            clients = choose_clients(config, round_index)
            for client in clients:
                questions = sample_examples(
                    self.federation.clients[client], config.client.prompts_per_round, derive_seed(config.seed, round_index, client, "prompts")
                )
                dealt = round_robin(questions, people)
                tally = simulate_people(f"http://{self.addresses[client]}", dealt, self.judge, config.spear.num_revisions, self.token)
                if tally.errors:
                    raise RuntimeError(f"device {client}: {tally.errors[0]}")
                self.tallies.append((round_index, client, tally.summary()))
            return clients

    return PeopleFirst


def live_demo(config: RunConfig, people: int = 4, base_port: int = 8101, show_progress: bool = True) -> dict:
    """Run `config`'s rounds through one in-process device service per client, device i on 127.0.0.1:base_port + i
    (fixed, so that the run folder's config matches when the demo resumes); returns the run's summary."""
    services = []
    try:
        for client in range(config.data.num_clients):
            store = Path(config.output_dir) / "devices" / f"device{client}.sqlite"
            device_config = config.model_copy(update={"live": config.live.model_copy(update={"store": str(store)})})
            service = build_service(device_config, context=build_context(device_config))
            services.append(ServiceThread(service, port=base_port + client if base_port else 0))
        live = config.live.model_copy(update={"devices": [service.address for service in services], "min_interactions": 1})
        run = FederatedRun(config.model_copy(update={"live": live}), people_first(people), show_progress=show_progress)
        return run.run()
    finally:
        for service in services:
            service.stop()
