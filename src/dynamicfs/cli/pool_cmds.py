"""`init`: create a pool."""

from __future__ import annotations

import click

from dynamicfs.admin.init import init_pool
from dynamicfs.cli.common import flexible, print_json
from dynamicfs.sizes import format_size, parse_size


def register(cli: click.Group) -> None:
    @cli.command("init")
    @flexible("pool")
    @click.option("--extent-size", default="1MiB", show_default=True,
                  help="size of an extent (4KiB to 64MiB)")
    @click.option("--default-policy", default="auto", show_default=True,
                  help="replicate:N, ec:K+M or auto")
    @click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
    def init(pool: str, extent_size: str, default_policy: str, as_json: bool) -> None:
        """Create a new, empty pool in directory POOL."""
        size = parse_size(extent_size)
        result = init_pool(pool, size, default_policy)
        if as_json:
            print_json(result)
        else:
            click.echo(f"created pool {result['pool']} (uuid {result['uuid']}, extents of "
                       f"{format_size(size)}, default policy {result['default_policy']})")
            click.echo(f"next: dynamicfs add-disk {result['pool']} DISK_DIRECTORY")
