"""Images: building the coi image and custom images, local Debian bases, and managing local images.

Owns everything about images: what a base reference names (``refs``), what the coi
image is made from (``inputs``), local Debian bases built with mmdebstrap
(``bootstrap``), one build from launch to publish (``build``, composed of
``log``, ``progress``, ``builder``, ``run``, ``dns`` and ``publish``), and the
image commands' services (``manage``).

It talks to Incus only through the client it is given (never builds one), and
never imports ``coi.cli``: it returns data and reports progress through the
``log``/``output``/``progress`` callables it is given. All the builder's exec goes
through ``coi.images.run``, which holds its lost-PID policy.

The bootstrap's ``parse_base`` and ``inputs_hash`` are reached as
``coi.images.bootstrap.*``: the package's own ``parse_base`` reads a whole base
reference.
"""

from __future__ import annotations

from coi.images.bootstrap import alias_for, ensure_base, host_debian_mirror
from coi.images.build import COI_STEPS, BuildError, build_coi, build_custom
from coi.images.builder import PROFILES
from coi.images.dns import DNS_PROBE, default_gateway, resolv_is_stub_only
from coi.images.inputs import (IMAGE_FORMAT, TOOL_PACKAGES, coi_inputs_hash, coi_script, host_ca_files,
                               normalise_tools, sha)
from coi.images.log import Log, log_path
from coi.images.manage import (ImageInfo, cleanup_images, delete_image, human_size, image_exists, list_images,
                               plan_cleanup, publish_container, timestamp)
from coi.images.refs import COI_ALIAS, DEFAULT_BASE, REMOTE_SERVER, Base, parse_base
from coi.sessions import CONTAINER_CONFIG  # what every container from a coi image gets

__all__ = [
    "COI_ALIAS", "COI_STEPS", "CONTAINER_CONFIG", "DEFAULT_BASE", "DNS_PROBE", "IMAGE_FORMAT", "PROFILES",
    "REMOTE_SERVER", "TOOL_PACKAGES", "Base", "BuildError", "ImageInfo", "Log", "alias_for", "build_coi",
    "build_custom", "cleanup_images", "coi_inputs_hash", "coi_script", "default_gateway", "delete_image",
    "ensure_base", "host_ca_files", "host_debian_mirror", "human_size", "image_exists", "list_images",
    "log_path", "normalise_tools", "parse_base", "plan_cleanup", "publish_container", "resolv_is_stub_only",
    "sha", "timestamp",
]
