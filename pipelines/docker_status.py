"""A fix for KFP's DockerRunner (kfp 2.17): it starts each step's container with `auto_remove=True` and
reports SUCCESS when the container is gone before its exit status is read, which with podman is almost
always, so a failed step passes and the pipeline goes on (kubeflow/pipelines#13332; fixes proposed in
#13381, #13402, #13907, not released). `install()` swaps in a runner of the container that keeps it
until its status is read, then removes it. It changes nothing else: same image check, command, volumes
and arguments."""

from __future__ import annotations

from typing import Any


def run_container_keeping_status(client: Any, image: str, command: list[str], volumes: dict[str, Any],
                                 **container_run_args: Any) -> int:
    """Run a step's container, stream its log, and return its real exit status."""
    from kfp.local import docker_task_handler

    image = docker_task_handler.add_latest_tag_if_not_present(image)
    if not any(image in (img.tags + img.attrs.get("RepoDigests", [])) for img in client.images.list()):
        client.images.pull(image)
    container = client.containers.run(image=image, command=command, detach=True, stdout=True, stderr=True,
                                      volumes=volumes, **container_run_args)
    try:
        for line in container.logs(stream=True):
            print(line.decode(), end="")
        return int(container.wait()["StatusCode"])
    finally:
        container.remove(force=True)


def install() -> None:
    """Make KFP's DockerRunner use `run_container_keeping_status`."""
    from kfp.local import docker_task_handler

    docker_task_handler.run_docker_container = run_container_keeping_status
