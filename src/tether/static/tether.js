// The browser client arrives with issue 3/7.
