{{/* Chart name, overridable. */}}
{{- define "locus.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Release-qualified name, at most 45 characters: the StatefulSet "<name>-writer" stays within the 52
that its controller-revision-hash label allows, and "<name>-writer-headless" within 63.
*/}}
{{- define "locus.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 45 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 45 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 45 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "locus.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "locus.selectorLabels" -}}
app.kubernetes.io/name: {{ include "locus.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "locus.labels" -}}
helm.sh/chart: {{ include "locus.chart" . }}
{{ include "locus.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "locus.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "locus.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "locus.image" -}}
{{- $tag := .Values.image.tag | default (ternary (printf "%s-cuda" .Chart.AppVersion) .Chart.AppVersion .Values.gpu.enabled) }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/* The Secret holding the bearer tokens; empty when there are none. */}}
{{- define "locus.authSecret" -}}
{{- if .Values.auth.existingSecret }}
{{- .Values.auth.existingSecret }}
{{- else if or .Values.auth.writeToken .Values.auth.queryToken }}
{{- printf "%s-auth" (include "locus.fullname" .) }}
{{- end }}
{{- end }}

{{/* A file:// store's path, empty for object stores. */}}
{{- define "locus.storePath" -}}
{{- if hasPrefix "file://" .Values.store.url }}
{{- trimPrefix "file://" .Values.store.url }}
{{- end }}
{{- end }}

{{/*
locus.toml from .Values.config. Helm reads every YAML number as a float, so whole numbers are
written as TOML integers (`batch-size = 8`, not `8.0`); strings are JSON-quoted, which is valid
TOML basic-string syntax.
*/}}
{{- define "locus.toml" -}}
# From the chart's `config` value; unset keys keep the defaults of `locus serve --help`.
{{- range $key := keys .Values.config | sortAlpha }}
{{- $v := get $.Values.config $key }}
{{- if and (kindIs "float64" $v) (eq $v (float64 (int64 $v))) }}
{{ $key }} = {{ int64 $v }}
{{- else }}
{{ $key }} = {{ toJson $v }}
{{- end }}
{{- end }}
{{- end }}

{{/* Cross-field rules that values.schema.json cannot express. */}}
{{- define "locus.validate" -}}
{{- if and .Values.readers.enabled (not .Values.store.url) }}
{{- fail "readers.enabled needs store.url: readers serve the versions the writer publishes there (s3://, gs://, az://, or file:// on store.sharedVolume); without readers leave store.url empty" }}
{{- end }}
{{- $path := include "locus.storePath" . }}
{{- $shared := .Values.store.sharedVolume }}
{{- if and $path .Values.readers.enabled (not $shared.claimName) }}
{{- fail "store.url is a file:// path but store.sharedVolume.claimName is empty: readers cannot see the writer's files" }}
{{- end }}
{{- if and $path $shared.claimName (not (hasPrefix (printf "%s/" (trimSuffix "/" $shared.mountPath)) $path)) }}
{{- fail (printf "store.url path %s is not under store.sharedVolume.mountPath %s" $path $shared.mountPath) }}
{{- end }}
{{- $as := .Values.readers.autoscaling }}
{{- if and .Values.readers.enabled $as.enabled }}
{{- if gt (int $as.minReplicas) (int $as.maxReplicas) }}
{{- fail "readers.autoscaling.minReplicas is above maxReplicas" }}
{{- end }}
{{- if not (dig "requests" "cpu" "" .Values.readers.resources) }}
{{- fail "readers.autoscaling needs readers.resources.requests.cpu: CPU utilization is measured against it" }}
{{- end }}
{{- end }}
{{- $grace := 30 }}
{{- if hasKey .Values.config "shutdown-grace" }}
{{- $grace = get .Values.config "shutdown-grace" }}
{{- end }}
{{- if ge (int $grace) (int .Values.terminationGracePeriodSeconds) }}
{{- fail "terminationGracePeriodSeconds must exceed config.shutdown-grace, or the kubelet kills the server before it drains" }}
{{- end }}
{{- end }}

{{/*
The pod spec shared by the writer and the readers. Call with (dict "root" $ "role" "writer").
*/}}
{{- define "locus.podSpec" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $writer := eq .role "writer" }}
{{- $secret := include "locus.authSecret" $root -}}
serviceAccountName: {{ include "locus.serviceAccountName" $root }}
# Nothing in the pod talks to the Kubernetes API.
automountServiceAccountToken: false
# locus reads LOCUS_* variables as settings, and service links would inject LOCUS_WRITER_PORT and
# the like into that namespace.
enableServiceLinks: false
terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
{{- with $v.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  runAsNonRoot: true
  # The image's locus user; fsGroup makes the data volume writable by it.
  runAsUser: 10001
  runAsGroup: 10001
  fsGroup: 10001
  fsGroupChangePolicy: OnRootMismatch
  seccompProfile:
    type: RuntimeDefault
{{- $nodeSelector := merge (deepCopy $v.nodeSelector) (ternary $v.gpu.nodeSelector dict $v.gpu.enabled) }}
{{- with $nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- $tolerations := concat $v.tolerations (ternary $v.gpu.tolerations list $v.gpu.enabled) }}
{{- with $tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
containers:
  - name: locus
    image: {{ include "locus.image" $root }}
    imagePullPolicy: {{ $v.image.pullPolicy }}
    args:
      - serve
      - --config=/etc/locus/locus.toml
      - --grpc-addr=0.0.0.0:50051
      - --metrics-addr=0.0.0.0:9090
      {{- if $v.http.enabled }}
      - --http-addr=0.0.0.0:{{ $v.http.port }}
      {{- end }}
      - --role={{ .role }}
      {{- with $v.store.url }}
      - --store={{ . }}
      {{- end }}
      - --model={{ $v.model.path }}
      {{- if $writer }}
      - --data-dir=/data
      {{- end }}
      {{- if $v.gpu.enabled }}
      - --device=cuda:0
      {{- end }}
    ports:
      - name: grpc
        containerPort: 50051
      - name: metrics
        containerPort: 9090
      {{- if $v.http.enabled }}
      - name: http
        containerPort: {{ $v.http.port }}
      {{- end }}
    {{- if or $secret $v.store.existingSecret $v.gpu.enabled $v.env }}
    env:
      {{- if $secret }}
      {{- if or $v.auth.existingSecret $v.auth.writeToken }}
      - name: LOCUS_WRITE_TOKEN
        valueFrom:
          secretKeyRef:
            name: {{ $secret }}
            key: write-token
      {{- end }}
      {{- if or $v.auth.existingSecret $v.auth.queryToken }}
      - name: LOCUS_QUERY_TOKEN
        valueFrom:
          secretKeyRef:
            name: {{ $secret }}
            key: query-token
            optional: true
      {{- end }}
      {{- end }}
      {{- if $v.gpu.enabled }}
      # The driver caches JIT-compiled kernels under $HOME, which is read-only here.
      - name: CUDA_CACHE_PATH
        value: /tmp/cuda-cache
      {{- end }}
      {{- with $v.env }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    {{- end }}
    {{- with $v.store.existingSecret }}
    envFrom:
      - secretRef:
          name: {{ . }}
    {{- end }}
    startupProbe:
      grpc:
        port: 50051
      periodSeconds: {{ $v.startupProbe.periodSeconds }}
      failureThreshold: {{ $v.startupProbe.failureThreshold }}
      timeoutSeconds: 5
    readinessProbe:
      grpc:
        port: 50051
      periodSeconds: 10
      timeoutSeconds: 5
      failureThreshold: 3
    # Lenient: a learning step saturates the CPUs, and a restart costs a model load and a replay.
    livenessProbe:
      grpc:
        port: 50051
      periodSeconds: 20
      timeoutSeconds: 10
      failureThreshold: 6
    {{- $res := $writer | ternary $v.writer.resources $v.readers.resources }}
    {{- $limits := deepCopy ($res.limits | default dict) }}
    {{- if $v.gpu.enabled }}
    {{- $_ := set $limits "nvidia.com/gpu" 1 }}
    {{- end }}
    resources:
      {{- with $res.requests }}
      requests:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $limits }}
      limits:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    securityContext:
      allowPrivilegeEscalation: false
      readOnlyRootFilesystem: true
      capabilities:
        drop: [ALL]
    volumeMounts:
      - name: config
        mountPath: /etc/locus
        readOnly: true
      - name: tmp
        mountPath: /tmp
      - name: shm
        mountPath: /dev/shm
      {{- if $writer }}
      - name: data
        mountPath: /data
      {{- end }}
      {{- if $v.store.sharedVolume.claimName }}
      - name: store
        mountPath: {{ $v.store.sharedVolume.mountPath }}
        readOnly: {{ not $writer }}
      {{- end }}
      {{- if $v.model.volume }}
      - name: model
        mountPath: {{ $v.model.mountPath }}
        readOnly: true
      {{- end }}
volumes:
  - name: config
    configMap:
      name: {{ include "locus.fullname" $root }}
  - name: tmp
    emptyDir: {}
  - name: shm
    emptyDir:
      medium: Memory
      sizeLimit: {{ $v.shm.sizeLimit }}
  {{- with $v.store.sharedVolume.claimName }}
  - name: store
    persistentVolumeClaim:
      claimName: {{ . }}
  {{- end }}
  {{- with $v.model.volume }}
  - name: model
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/*
Pod template annotations: roll the pods when their settings change. Tokens get no such checksum:
a hash of a short token in pod metadata could be brute-forced.
*/}}
{{- define "locus.podAnnotations" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- end }}
