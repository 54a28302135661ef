Reliability: request bodies over max_request_body get 413 unread; idle clients time out; bench/compare.py measures start-up, idle RSS and API throughput against the reference agent.
