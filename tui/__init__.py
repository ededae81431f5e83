"""The homepbx terminal UI (Textual), a client of the daemon's control socket."""
