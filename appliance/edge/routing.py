"""What the call router offers the features it hands requests to.

Transfer, forwarding, pickup and the feature codes (`transfers`, `forwarding`, `pickup`,
`feature_codes`) each decide what their requests become, and have the router carry it out
through this interface: a final answer, a fork to devices or to a worker, a leg to the
provider, the call's outgoing count. They read the calls in progress and the facts the
call policy asks for from it too, and keep no table of their own. The router implements
it; a feature never imports the router.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from appliance.call_policy import CallInProgress, RingNumber, ToProvider
from appliance.config import LiveConfig, TrunkConfig
from appliance.edge.dialogs import Dialog
from appliance.edge.seams import CallEvents, MediaAnchor
from appliance.sip.invite_transaction import Send
from appliance.sip.message import Request
from appliance.sip.proxy import Authorize, ForkEvent, ForkSettings, RelayBody, SendRequest, Target
from appliance.sip.registrar import Flow

CALL_OUT_TIMEOUT = 180.0
"""How long a call out may ring at the far end before we give up (the provider usually decides first)."""


ProviderBranch = tuple[Target[Flow], Authorize, RelayBody[Flow]]
"""What a fork needs to ring a number at a provider: the target, the trunk's credentials
for its challenge, the offer cut to G.711."""


class Routing(Protocol):
    """The call router as its features see it (`CallRouter` implements it)."""

    @property
    def settings(self) -> LiveConfig: ...

    @property
    def live(self) -> CallEvents: ...

    @property
    def media(self) -> MediaAnchor | None: ...

    @property
    def outgoing(self) -> dict[str, int]:
        """Number -> calls it places now (its outgoing limit counts these)."""

    def now(self) -> float: ...

    # -- the calls in progress -----------------------------------------------------------------
    def call(self, token: str) -> Dialog | None:
        """The first dialog of call `token` (its A-leg), while the call goes on."""

    def dialog(self, call_id: str) -> Dialog | None:
        """The dialog with this Call-ID, a lingering one too."""

    def dialogs(self) -> Iterable[Dialog]:
        """Every dialog followed now, the lingering ones too."""

    def add_call(self, dialog: Dialog) -> None:
        """`dialog` starts a call of its own (its token names it)."""

    def hold_invite(self, key: str | None, dialog: Dialog) -> None:
        """Retransmissions of `dialog`'s INVITE (server transaction `key`) are absorbed
        while a worker is found for it."""

    def release_invite(self, key: str | None, dialog: Dialog) -> None:
        """Undo `hold_invite` when no fork follows."""

    # -- carrying a decision out ---------------------------------------------------------------
    def reply(self, request: Request, dest: Flow, status: int, reason: str,
              headers: list[tuple[str, str]] | None = None) -> None: ...

    def start_fork(self, dialog: Dialog, dest: Flow, key: str | None, targets: list[Target[Flow]],
                   settings: ForkSettings, extra_headers: list[tuple[str, str]], now: float,
                   *, record_route: bool = True, authorize: Authorize | None = None,
                   relay_body: RelayBody[Flow] | None = None) -> None: ...

    def apply(self, dialog: Dialog, actions: list[Send[Flow] | SendRequest[Flow] | ForkEvent]) -> None:
        """Carry out what a dialog's fork asks for."""

    def worker_flow(self, port: int) -> Flow:
        """The flow to the media worker on `port`."""

    def to_worker(self, dialog: Dialog, dest: Flow, key: str | None, port: int | None, settings: ForkSettings,
                  headers: list[tuple[str, str]]) -> None:
        """Relay `dialog`'s INVITE to the media worker on `port` (None: every worker busy)."""

    def to_provider(self, request: Request, flow: Flow, dest: Flow, key: str | None, a_leg: Dialog,
                    decision: ToProvider, now: float, extra_headers: list[tuple[str, str]] | None = None) -> None:
        """A worker's leg out to the provider of `decision`'s trunk."""

    def provider_branch(self, trunk: TrunkConfig, number: str, token: str) -> ProviderBranch | None: ...

    def end(self, dialog: Dialog, reason: str) -> None:
        """A dialog is over."""

    def charge(self, first: Dialog, number: str) -> None:
        """A call out that `number` caused counts on its outgoing limit until call `first` ends."""

    # -- facts for the call policy -------------------------------------------------------------
    def identity(self, caller: str, trunk: str | None) -> str:
        """Who the callee's display shows (P-Asserted-Identity)."""

    def targets(self, decision: RingNumber) -> list[Target[Flow]]:
        """The devices a decision rings, as fork targets."""

    def reachable(self, number: str) -> list[str]: ...

    def device_id(self, number: str, binding_id: str) -> str: ...

    def device_of(self, number: str, flow: Flow) -> str | None: ...

    def in_progress(self) -> list[CallInProgress]: ...

    def is_worker(self, flow: Flow) -> bool: ...
