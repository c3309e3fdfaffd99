"""The Ray Serve app that draws images from the promoted generator.

request.py      what a request may ask (schema and limits), checked before the model
model_card.py   what /v1/model says about the served model
http.py         the FastAPI surface of a replica (routes, body limit, encodings)
replica.py      what a replica does with a parsed request (limits, batch policy, drawing,
                the answer), apart from the server and its batch queue
swap.py         which model a replica serves: verified load, sanity batch, pointer watch,
                back-off of failed swaps, and what /healthz says
app.py          the deployment (batching, hot swap) and the application builder that
                ``fewstep serve``, ``serve run``/``serve deploy`` and KubeRay all start
"""
