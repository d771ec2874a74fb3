def default_socket():
    raise NotImplementedError
