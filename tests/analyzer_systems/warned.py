"""A system with warnings only: `choreo lint` exits 0, and 1 with --fail-on warning."""

from choreo import Command, Event, Service


class Register(Command):
    user_id: str


class UserRegistered(Event, key="user_id"):
    user_id: str


accounts = Service("accounts")


@accounts.command(Register, emits=[UserRegistered])  # nobody consumes UserRegistered: a warning
def register(cmd, ctx):
    ctx.emit(UserRegistered(user_id=cmd.user_id))
