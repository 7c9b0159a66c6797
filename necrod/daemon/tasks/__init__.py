"""The dispatcher's rooms. ``necrod.daemon.dispatcher.Dispatcher`` builds them and hands each, in
its constructor, what it uses. Their imports point one way: ``runs`` (what every room shares),
``runners`` (the launchers) and ``profiles`` are at the bottom; ``taskbook`` uses ``profiles``;
``attempts`` is given the task book; ``placement``, ``recovery`` and ``hostwatch`` import no
other room's class and are given what they call of the others as callables."""
