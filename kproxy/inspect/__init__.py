"""Inspection commands: render (what would be written), status (what is programmed), explain
(how a packet travels). They read; they never change the kernel."""
