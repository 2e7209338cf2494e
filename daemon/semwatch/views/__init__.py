"""What operators and first-time users see: the live dashboard and `semwatch top`, `inspect`,
`bench` and `demo`. Views call the layers below; nothing below imports a view."""
