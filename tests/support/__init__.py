"""What the tests share: the daemon as a process, a TCP proxy to cut, the fake forges and
illumos tools, the local RabbitMQ cluster, raw HTTP, /proc readings."""
