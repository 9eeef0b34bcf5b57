"""Networks: plain reference modules (``reference``), the registry of network kinds
(``registry``), batched recurrent layers (``recurrent``) and population models (``population``)."""
