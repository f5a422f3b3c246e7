-- wrk script for the small-file cells: PUT, GET or HEAD of files whose bytes
-- are derived from their id, so every answer can be checked without a copy.
--
-- Arguments (after `--` on the wrk command line):
--   mode        put | get | head
--   first_id    put: ids start after it; get/head: the pool is first_id+1 .. first_id+count
--   count       get/head: size of the pre-populated pool
--   size        bytes per file (content: see bench/content.py small_content)
--   stride      put: id distance between threads, so no two requests share an id
--   per_thread  connections per wrk thread; with 1 the answer must be for the last id asked
--   flavour     pacifica (default): PUT 201 with total_bytes, HEAD 204 with X-Content-Length;
--               plain (a WebDAV server such as nginx): PUT 201 or 204, HEAD 200 with Content-Length
--
-- wrk runs setup() and done() in its main Lua state and init/request/response in
-- one state per thread, so the per-thread counters are read back with thread:get.
-- done() prints one "BENCH_RESULT key=value ..." line that bench/smallfiles.py parses.

local threads = {}

function setup(thread)
   thread:set("thread_index", #threads)
   table.insert(threads, thread)
end

-- The same bytes as bench/content.py small_content: "<id>.0;<id>.1;..." cut to size.
-- Built as table.concat({"", ".0;", ".1;", ...}, id): one C call per file, because
-- the client shares the two CPUs with the servers and must stay cheap.
local suffixes_for_width = {}

local function content(id)
   local digits = string.format("%d", id)
   local suffixes = suffixes_for_width[#digits]
   if suffixes == nil then
      suffixes = {""}
      local length, k = 0, 0
      while length < size do
         local unit = "." .. k .. ";"
         suffixes[#suffixes + 1] = unit
         length = length + #digits + #unit
         k = k + 1
      end
      suffixes_for_width[#digits] = suffixes
   end
   return table.concat(suffixes, digits):sub(1, size)
end

local function header(headers, name)
   local wanted = name:lower()
   for key, value in pairs(headers) do
      if key:lower() == wanted then
         return value
      end
   end
   return nil
end

function init(args)
   mode = args[1]
   first_id = tonumber(args[2])
   count = tonumber(args[3])
   size = tonumber(args[4])
   stride = tonumber(args[5])
   per_thread = tonumber(args[6])
   plain = args[7] == "plain"
   -- Counters read by done(); plain globals so thread:get can copy them.
   issued, checked, bad_status, bad_body = 0, 0, 0, 0
   first_put = first_id + thread_index * stride + 1
   last_put = first_put - 1
   -- get/head: each thread starts at its own place in the pool.
   cursor = (thread_index * 7919) % count
   pending, last_id, expected = {}, nil, {}
   if mode == "get" then
      -- Built here, before wrk starts its clock, not during the measurement.
      for id = first_id + 1, first_id + count do
         expected[id] = content(id)
      end
   end
   put_headers = {["Last-Modified"] = "Sun, 06 Nov 1994 08:49:37 GMT",
                  ["Content-Type"] = "application/octet-stream"}
   total_pattern = '"total_bytes":%s*' .. size .. "[^%d]"
end

function request()
   issued = issued + 1
   if mode == "put" then
      last_put = last_put + 1
      return wrk.format("PUT", "/" .. string.format("%d", last_put), put_headers, content(last_put))
   end
   cursor = cursor % count + 1
   local id = first_id + cursor
   pending[id] = (pending[id] or 0) + 1
   last_id = id
   return wrk.format(mode == "get" and "GET" or "HEAD", "/" .. string.format("%d", id))
end

-- True when the GET body is exactly the file of an id this thread asked for.
local function good_get_body(body)
   local id = tonumber(body:match("^(%d+)%.0;"))
   if id == nil or (pending[id] or 0) < 1 then
      return false
   end
   if per_thread == 1 and id ~= last_id then
      return false
   end
   pending[id] = pending[id] - 1
   return body == expected[id]
end

function response(status, headers, body)
   checked = checked + 1
   if mode == "put" then
      if status ~= 201 and not (plain and status == 204) then
         bad_status = bad_status + 1
      elseif not plain and not (body .. " "):find(total_pattern) then
         bad_body = bad_body + 1
      end
   elseif mode == "get" then
      if status ~= 200 then
         bad_status = bad_status + 1
      elseif not good_get_body(body) then
         bad_body = bad_body + 1
      end
   elseif plain then
      if status ~= 200 then
         bad_status = bad_status + 1
      elseif header(headers, "Content-Length") ~= tostring(size) then
         bad_body = bad_body + 1
      end
   else
      if status ~= 204 then
         bad_status = bad_status + 1
      elseif header(headers, "X-Content-Length") ~= tostring(size) then
         bad_body = bad_body + 1
      end
   end
end

function done(summary, latency, requests)
   local sums = {issued = 0, checked = 0, bad_status = 0, bad_body = 0}
   local ranges = {}
   for _, thread in ipairs(threads) do
      for key, _ in pairs(sums) do
         sums[key] = sums[key] + (thread:get(key) or 0)
      end
      if thread:get("mode") == "put" then
         table.insert(ranges, string.format("%d-%d", thread:get("first_put"), thread:get("last_put")))
      end
   end
   local errors = summary.errors
   io.write(string.format(
      "BENCH_RESULT requests=%d duration_us=%d p50_us=%.1f p99_us=%.1f mean_us=%.1f max_us=%.1f"
         .. " issued=%d checked=%d bad_status=%d bad_body=%d http_status=%d"
         .. " sock_connect=%d sock_read=%d sock_write=%d sock_timeout=%d put_ranges=%s\n",
      summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
      latency.mean, latency.max, sums.issued, sums.checked, sums.bad_status, sums.bad_body,
      errors.status, errors.connect, errors.read, errors.write, errors.timeout,
      #ranges > 0 and table.concat(ranges, ",") or "-"))
end
