"""Real-but-small stand-ins (live servers on 127.0.0.1) that tests talk to over sockets."""
