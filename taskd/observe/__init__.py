"""What the daemon shows about itself: metrics, health, loop lag and the status page."""
